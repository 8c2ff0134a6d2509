"""Run the emulator as a foreground server until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from gpujobs.emulator.app import Emulator
from gpujobs.emulator.faults import FaultPlan


async def serve(port: int = 0, seed: int = 0, faults_path: Path | None = None,
                api_key: str | None = None, time_scale: float = 1.0,
                loading_s: float = 2.0) -> None:
    """Start the emulator, print its URL (and the key when it generated one), run until a signal.

    This is the one place the generated key is printed: the user needs it to call the emulator.
    """
    faults = FaultPlan.from_file(faults_path) if faults_path else None
    emulator = Emulator(seed=seed, api_key=api_key, time_scale=time_scale,
                        loading_s=loading_s, faults=faults)
    url = await emulator.start(port=port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        print(f"Vast.ai emulator listening on {url}", flush=True)
        print(f"export VAST_URL={url}", flush=True)
        if emulator.api_key_generated:
            print(f"export VAST_API_KEY={emulator.api_key}", flush=True)
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await emulator.stop()
        print("Vast.ai emulator stopped", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Command line for ``python -m gpujobs.emulator``."""
    parser = argparse.ArgumentParser(prog="python -m gpujobs.emulator",
                                     description="Run a local Vast.ai API emulator.")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the market and faults")
    parser.add_argument("--faults", type=Path, default=None, help="fault plan, YAML or JSON")
    parser.add_argument("--api-key", default=None, help="key to accept (default: generate one)")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="billed seconds per real second")
    parser.add_argument("--loading-s", type=float, default=2.0,
                        help="real seconds an instance spends loading before its command starts")
    options = parser.parse_args(argv)
    asyncio.run(serve(options.port, options.seed, options.faults, options.api_key,
                      options.time_scale, options.loading_s))
