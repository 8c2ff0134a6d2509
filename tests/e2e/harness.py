"""A live stack for end-to-end tests: emulator, supervisor and real worker processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from gpujobs.emulator import Emulator, FaultPlan
from gpujobs.jobs import submit
from gpujobs.jobspec import JobSpec
from gpujobs.settings import Settings, load_settings
from gpujobs.states import JobState
from gpujobs.supervisor.core import Supervisor
from gpujobs.vast.client import VastClient
from gpujobs.vast.transport import DEFAULT_MIN_INTERVAL_S

NO_PACING = {endpoint: 0.0 for endpoint in DEFAULT_MIN_INTERVAL_S}


class Stack:
    def __init__(self, settings: Settings, emulator: Emulator, client: VastClient,
                 supervisor: Supervisor) -> None:
        self.settings = settings
        self.emulator = emulator
        self.client = client
        self.supervisor = supervisor
        self.loop_task: asyncio.Task | None = None

    def start_loop(self) -> None:
        self.loop_task = asyncio.get_running_loop().create_task(self.supervisor.run())

    async def submit(self, **spec: Any) -> str:
        values = {"name": "digits", "profile": "dev-test", "total_steps": 200,
                  "checkpoint_every": 25, "step_delay_s": 0.005, "heartbeat_interval_s": 0.3,
                  "grace_period_s": 2.0}
        values.update(spec)
        return await submit(self.settings, JobSpec(**values), store=self.supervisor.store)

    def job(self, job_id: str) -> dict[str, Any] | None:
        return self.supervisor.table.jobs.get(job_id)

    def state(self, job_id: str) -> str | None:
        job = self.job(job_id)
        return None if job is None else job["state"]

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 90.0,
                       what: str = "condition") -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if self.loop_task is not None and self.loop_task.done():
                self.loop_task.result()
                raise AssertionError("the supervisor loop stopped")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
            await asyncio.sleep(0.05)

    async def wait_settled(self, job_id: str, timeout_s: float = 90.0) -> dict[str, Any]:
        def settled() -> bool:
            job = self.job(job_id)
            return (job is not None and JobState(job["state"]).is_terminal
                    and not self.supervisor.table.live_attempts(job_id))

        await self.wait_for(settled, timeout_s, f"job {job_id} to end")
        return self.job(job_id)  # type: ignore[return-value]


@asynccontextmanager
async def live_stack(home: Path, *, faults: FaultPlan | None = None, time_scale: float = 1.0,
                     loading_s: float = 0.5, **settings_changes: Any) -> AsyncIterator[Stack]:
    changes = {"tick_s": 0.25, "heartbeat_timeout_s": 10.0, "unreachable_grace_s": 10.0,
               "cost_interval_s": 2.0}
    changes.update(settings_changes)
    settings = load_settings(home=home).replace(**changes)
    emulator = Emulator(seed=3, loading_s=loading_s, workdir=home / "emulator", faults=faults,
                        time_scale=time_scale, rate_limits=False)
    url = await emulator.start()
    client = VastClient(api_key=emulator.api_key, base_url=url, min_interval_s=NO_PACING,
                        backoff_base_s=0.01, backoff_cap_s=0.2)
    supervisor = Supervisor(settings, client, billing_time_scale=time_scale,
                            intent_timeout_s=5.0)
    stack = Stack(settings, emulator, client, supervisor)
    try:
        await supervisor.start()
        yield stack
    finally:
        supervisor.request_stop()
        if stack.loop_task is not None:
            await asyncio.gather(stack.loop_task, return_exceptions=True)
        await supervisor.stop()
        await client.close()
        await emulator.stop()


async def wait_for_checkpoint(stack: Stack, job_id: str) -> int:
    """Wait until the job runs with a durable checkpoint; return its instance id."""

    def checkpointed() -> bool:
        job = stack.job(job_id)
        return bool(job and job["state"] == "running" and job["last_checkpoint_step"])

    await stack.wait_for(checkpointed, what="first checkpoint")
    return int(stack.job(job_id)["instance_id"])


async def stop_supervisor(stack: Stack) -> None:
    stack.supervisor.request_stop()
    if stack.loop_task is not None:
        await asyncio.gather(stack.loop_task, return_exceptions=True)
        stack.loop_task = None
    await stack.supervisor.stop()


async def start_new_supervisor(stack: Stack) -> None:
    """Start a fresh supervisor on the same journal, emulator and client: nothing in memory.

    The caller stops it with `stop_supervisor`, because the stack's teardown stops only the
    supervisor it started.
    """
    old = stack.supervisor
    stack.supervisor = Supervisor(stack.settings, stack.client,
                                  billing_time_scale=old.billing_time_scale,
                                  intent_timeout_s=old.intent_timeout_s)
    await stack.supervisor.start()
