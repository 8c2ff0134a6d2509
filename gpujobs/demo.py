"""`gpujobs demo`: a real training job on the local emulator, preempted once, resumed, finished.

Everything runs in this process's event loop except the worker, which the emulator starts as a
real process group, as a rented machine would run it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpujobs.emulator import Emulator
from gpujobs.jobs import submit
from gpujobs.jobspec import JobSpec
from gpujobs.replay import replay_job
from gpujobs.settings import Settings, load_settings
from gpujobs.states import JobState
from gpujobs.supervisor.core import Supervisor
from gpujobs.emulator.ratelimit import DEFAULT_THRESHOLDS_S
from gpujobs.vast.client import VastClient
from gpujobs.vast.transport import DEFAULT_MIN_INTERVAL_S

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoOptions:
    home: Path | None = None
    total_steps: int = 600
    checkpoint_every: int = 50
    step_delay_s: float = 0.02
    preempt_at_fraction: float = 0.45  # preempt once the job has done this share of its steps
    grace_period_s: float = 5.0
    timeout_s: float = 600.0
    seed: int = 7
    rate_limit_scale: float = 0.1  # the emulator's rate limits, as a share of the real ones


def demo_home(requested: Path | None) -> Path:
    if requested is not None:
        return requested
    env_home = os.environ.get("GPUJOBS_HOME")
    if env_home:
        return Path(env_home)
    return Path(tempfile.mkdtemp(prefix="gpujobs-demo-"))


def demo_settings(home: Path) -> Settings:
    return load_settings(home=home).replace(
        tick_s=0.25, heartbeat_timeout_s=20.0, unreachable_grace_s=20.0, cost_interval_s=5.0,
        report_port=0,
    )


async def run_demo(options: DemoOptions, say: Callable[[str], None]) -> dict[str, Any]:
    home = demo_home(options.home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    settings = demo_settings(home)
    say(f"gpujobs demo: state in {home}")
    # The emulator enforces Vast.ai's per-endpoint rate limits, scaled down so the demo's
    # supervisor can tick twice a second; the client paces itself to the same limits.
    limits = {name: value * options.rate_limit_scale for name, value in DEFAULT_THRESHOLDS_S.items()}
    emulator = Emulator(seed=options.seed, loading_s=1.0, workdir=home / "emulator",
                        rate_limits=limits)
    url = await emulator.start()
    say(f"Vast.ai emulator listening on {url}")
    pacing = {name: value * options.rate_limit_scale
              for name, value in DEFAULT_MIN_INTERVAL_S.items()}
    client = VastClient(api_key=emulator.api_key, base_url=url, min_interval_s=pacing)
    supervisor = Supervisor(settings, client, intent_timeout_s=15.0)
    try:
        await supervisor.start()
        return await _drive(options, settings, emulator, supervisor, say)
    finally:
        await supervisor.stop()
        await client.close()
        await emulator.stop()


async def _drive(options: DemoOptions, settings: Settings, emulator: Emulator,
                 supervisor: Supervisor, say: Callable[[str], None]) -> dict[str, Any]:
    spec = JobSpec(
        name="digits", profile="dev-test", team="research", project="digits",
        total_steps=options.total_steps, checkpoint_every=options.checkpoint_every,
        step_delay_s=options.step_delay_s, heartbeat_interval_s=0.5,
        grace_period_s=options.grace_period_s, seed=options.seed,
    )
    job_id = await submit(settings, spec, store=supervisor.store)
    say(f"submitted job {job_id} on profile dev-test ({spec.total_steps} steps, "
        f"checkpoint every {spec.checkpoint_every})")
    loop = asyncio.create_task(supervisor.run())
    try:
        preempted = await _preempt_midway(options, emulator, supervisor, job_id, say)
        await _wait(lambda: _is_settled(supervisor, job_id), options.timeout_s, loop)
    finally:
        supervisor.request_stop()
        await asyncio.gather(loop, return_exceptions=True)
    return await _summary(settings, emulator, supervisor, job_id, preempted)


async def _preempt_midway(options: DemoOptions, emulator: Emulator, supervisor: Supervisor,
                          job_id: str, say: Callable[[str], None]) -> dict[str, Any]:
    target = int(options.total_steps * options.preempt_at_fraction)

    def ready() -> bool:
        job = supervisor.table.jobs.get(job_id)
        if job is None:
            return False
        runtime = supervisor.table.runtime_for(job_id)
        return (job["state"] in ("running", "checkpointing") and runtime.max_step >= target
                and job["last_checkpoint_step"] is not None and job["instance_id"] is not None)

    await _wait(ready, options.timeout_s, None)
    job = supervisor.table.jobs[job_id]
    step = supervisor.table.runtime_for(job_id).max_step
    instance_id = int(job["instance_id"])
    say(f"preempting instance {instance_id} at step {step} (last checkpoint "
        f"{job['last_checkpoint_step']}): SIGTERM, {options.grace_period_s:.0f} s grace, SIGKILL")
    asyncio.get_running_loop().create_task(
        emulator.preempt(instance_id, sigterm=True, grace_s=options.grace_period_s)
    )
    return {"instance_id": instance_id, "step": step, "checkpoint": job["last_checkpoint_step"]}


def _is_settled(supervisor: Supervisor, job_id: str) -> bool:
    job = supervisor.table.jobs.get(job_id)
    return job is not None and JobState(job["state"]).is_terminal and not supervisor.table.live_attempts(job_id)


async def _wait(predicate: Callable[[], bool], timeout_s: float,
                loop: asyncio.Task | None) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if loop is not None and loop.done():
            loop.result()  # re-raise what stopped the supervisor
            raise RuntimeError("the supervisor stopped before the job finished")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the demo did not finish within {timeout_s:.0f} s")
        await asyncio.sleep(0.1)


async def _summary(settings: Settings, emulator: Emulator, supervisor: Supervisor, job_id: str,
                   preempted: dict[str, Any]) -> dict[str, Any]:
    replay = await replay_job(supervisor.store, job_id)
    events = await supervisor.store.read_stream(job_id)
    before = [e.data["step"] for e in events
              if e.type == "CheckpointSaved" and e.data["attempt"] == 1]
    command = (f"GPUJOBS_HOME={shlex.quote(str(settings.home))} {shlex.quote(gpujobs_command())} "
               f"replay --job {job_id}")
    return {
        "job_id": job_id,
        "state": replay.state,
        "states_visited": replay.states_visited,
        "attempts": replay.attempts,
        "preemptions": replay.preemptions,
        "preempted_at_step": preempted["step"],
        "checkpoint_step_at_preemption": preempted["checkpoint"],
        "last_checkpoint_step_before_preemption": max(before) if before else None,
        "resumed_from_step": replay.resumed_from_step,
        "test_accuracy": supervisor.table.metrics(job_id).get("test_accuracy"),
        "instances_alive_at_end": len(emulator.live_instance_ids()),
        "cost_usd": round(replay.cost_usd, 6),
        "emulator_charges_usd": round(emulator.total_charges_usd(), 6),
        "home": str(settings.home),
        "replay_command": command,
    }


def gpujobs_command() -> str:
    """Return how to run `gpujobs` from a shell: the bare name if PATH finds this one."""
    beside = Path(sys.executable).with_name("gpujobs")
    on_path = shutil.which("gpujobs")
    if beside.is_file() and (on_path is None or Path(on_path).resolve() != beside.resolve()):
        return str(beside)
    return "gpujobs"


def print_transitions(stream: Any = sys.stdout) -> logging.Handler:
    """Show the supervisor's one-line transition log while the demo runs."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s  %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("gpujobs.transitions")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handler
