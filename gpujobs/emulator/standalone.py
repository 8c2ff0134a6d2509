"""Run the emulator as a foreground server until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from gpujobs.emulator.app import Emulator
from gpujobs.emulator.errors import EmulatorError
from gpujobs.emulator.faults import FaultPlan, FaultRule, rules_from_flags


async def serve(port: int = 0, seed: int = 0, faults_path: Path | None = None,
                api_key: str | None = None, time_scale: float = 1.0,
                loading_s: float = 2.0, extra_rules: tuple[FaultRule, ...] = ()) -> None:
    """Start the emulator, print its URL (and the key when it generated one), run until a signal.

    ``extra_rules`` (from command-line flags) run after the rules of the plan file. This is
    the one place the generated key is printed: the user needs it to call the emulator.
    """
    if not 0 <= port <= 65535:
        raise EmulatorError(f"invalid --port {port}; use 0 to 65535 (0 picks a free port)")
    if not time_scale > 0:  # also rejects nan
        raise EmulatorError(f"invalid --time-scale {time_scale:g}; use a number above 0 "
                            "(emulated seconds per real second; 10 runs ten times faster)")
    if not loading_s >= 0:
        raise EmulatorError(f"invalid --loading-s {loading_s:g}; use 0 or more seconds")
    plan = FaultPlan.from_file(faults_path) if faults_path else FaultPlan()
    plan = plan.with_rules(extra_rules)
    emulator = Emulator(seed=seed, api_key=api_key, time_scale=time_scale,
                        loading_s=loading_s, faults=plan)
    try:
        url = await emulator.start(port=port)
    except OSError as exc:
        raise EmulatorError(f"cannot listen on 127.0.0.1:{port} ({exc.strerror or exc}); "
                            "pick another --port or 0 for a free one") from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        print(f"Vast.ai emulator listening on {url}", flush=True)
        print(f"export VAST_URL={url}", flush=True)
        if emulator.api_key_generated:
            print(f"export VAST_API_KEY={emulator.api_key}", flush=True)
        if plan.rules:
            kinds = ", ".join(rule.kind for rule in plan.rules)
            print(f"fault rules: {kinds}", flush=True)
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await emulator.stop()
        print("Vast.ai emulator stopped", flush=True)


def add_fault_flags(parser: argparse.ArgumentParser) -> None:
    """Add the flags that `rules_from_flags` turns into fault rules."""
    group = parser.add_argument_group("faults (added to the rules of --faults)")
    group.add_argument("--preempt-after", type=float, metavar="S",
                       help="preempt every instance S emulated seconds after it starts running")
    group.add_argument("--preempt-grace", type=float, default=5.0, metavar="S",
                       help="emulated seconds between SIGTERM and SIGKILL on preemption")
    group.add_argument("--hard-kill", action="store_true",
                       help="preempt with SIGKILL alone, with no SIGTERM first")
    group.add_argument("--offline-after", type=float, metavar="S",
                       help="drop every instance's host (status offline) after S seconds")
    group.add_argument("--unknown-after", type=float, metavar="S",
                       help="stop every host's heartbeat (status unknown) after S seconds")
    group.add_argument("--fail-rate", type=float, metavar="P",
                       help="share of API requests (0 to 1) that fail with HTTP 503")
    group.add_argument("--slow-s", type=float, metavar="S",
                       help="delay every API response by S real seconds")
    group.add_argument("--vanish-rate", type=float, metavar="P",
                       help="chance (0 to 1) that an offer is taken just before a create")


def main(argv: list[str] | None = None) -> None:
    """Command line for ``python -m gpujobs.emulator``."""
    parser = argparse.ArgumentParser(prog="python -m gpujobs.emulator",
                                     description="Run a local Vast.ai API emulator.")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the market and faults")
    parser.add_argument("--faults", type=Path, default=None, help="fault plan, YAML or JSON")
    parser.add_argument("--api-key", default=None, help="key to accept (default: generate one)")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="emulated seconds per real second, for billing and every delay")
    parser.add_argument("--loading-s", type=float, default=2.0,
                        help="emulated seconds an instance spends loading before its command")
    add_fault_flags(parser)
    options = parser.parse_args(argv)
    try:
        rules = rules_from_flags(
            preempt_after_s=options.preempt_after, preempt_grace_s=options.preempt_grace,
            hard_kill=options.hard_kill, offline_after_s=options.offline_after,
            unknown_after_s=options.unknown_after, fail_rate=options.fail_rate,
            slow_s=options.slow_s, vanish_rate=options.vanish_rate,
        )
        asyncio.run(serve(options.port, options.seed, options.faults, options.api_key,
                          options.time_scale, options.loading_s, rules))
    except EmulatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
