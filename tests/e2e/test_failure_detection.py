"""Failure kinds against the real emulator, supervisor and worker processes.

The cases: a silent worker, a hung one, one that never reports, a list that misses a healthy
instance, and a recovery held back by the concurrency limit. Each test checks the journal's
events for the attempt that failed and the job's final state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from pathlib import Path

import pytest

from gpujobs.jobs import list_jobs
from gpujobs.settings import load_settings
from gpujobs.supervisor import reconcile, recovery
from tests.e2e.harness import (
    Stack, live_stack, start_new_supervisor, stop_supervisor, wait_for_checkpoint,
)

pytestmark = pytest.mark.timeout(240)

WORKER = "gpujobs-worker train-digits"
SHOW_ENDPOINT = "GET /instances/{id}/"


async def attempt_events(stack: Stack, job_id: str, attempt: int) -> list[tuple[str, dict]]:
    events = await stack.supervisor.store.read_stream(job_id)
    return [(e.type, e.data) for e in events if e.data.get("attempt") == attempt]


def types_of(events: list[tuple[str, dict]]) -> list[str]:
    return [kind for kind, _ in events]


async def wait_for_event(stack: Stack, job_id: str, event_type: str,
                         timeout_s: float = 120.0) -> dict:
    """Poll the journal until the job has an event of `event_type`; return its data."""
    found: list[dict] = []

    async def scan() -> bool:
        events = await stack.supervisor.store.read_stream(job_id)
        found.extend(e.data for e in events if e.type == event_type)
        return bool(found)

    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await scan():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {event_type}")
        if stack.loop_task is not None and stack.loop_task.done():
            stack.loop_task.result()  # raises what stopped the supervisor loop
            raise AssertionError("the supervisor loop stopped")
        await asyncio.sleep(0.2)
    return found[0]


def worker_group(stack: Stack, instance_id: int) -> int:
    """The process group of the instance's command (the emulator starts it in a new session)."""
    instance = stack.emulator.fleet.get_live(instance_id)
    assert instance is not None and instance.process is not None
    return instance.process.pid


async def test_silent_worker_is_abandoned(tmp_path: Path) -> None:
    async with live_stack(tmp_path / "home", heartbeat_timeout_s=3.0,
                          unreachable_grace_s=3.0) as stack:
        stack.start_loop()
        job_id = await stack.submit(total_steps=400, step_delay_s=0.01)
        instance_id = await wait_for_checkpoint(stack, job_id)
        os.killpg(worker_group(stack, instance_id), signal.SIGSTOP)  # alive, but silent

        job = await stack.wait_settled(job_id, timeout_s=180)

        first = await attempt_events(stack, job_id, 1)
        kinds = types_of(first)
        assert "WorkerUnreachable" in kinds
        assert "WorkerAbandoned" in kinds
        assert kinds.index("WorkerUnreachable") < kinds.index("WorkerAbandoned")
        assert kinds.index("WorkerAbandoned") + 1 == kinds.index("PreemptionDetected")
        preemption = dict(first)["PreemptionDetected"]
        assert preemption["reason"] == "heartbeat_lost"
        assert job["state"] == "done"
        assert job["attempt"] == 2
        assert job["preemptions"] == 1
        assert job["restarts"] == 0
        ledger = stack.emulator.ledger()
        assert len(ledger) == 2
        assert all(row["destroyed_at"] is not None for row in ledger)


async def test_short_silence_is_tolerated(tmp_path: Path) -> None:
    async with live_stack(tmp_path / "home", heartbeat_timeout_s=2.0,
                          unreachable_grace_s=120.0) as stack:
        stack.start_loop()
        job_id = await stack.submit(total_steps=300, step_delay_s=0.01)
        instance_id = await wait_for_checkpoint(stack, job_id)
        group = worker_group(stack, instance_id)
        os.killpg(group, signal.SIGSTOP)
        await wait_for_event(stack, job_id, "WorkerUnreachable")
        os.killpg(group, signal.SIGCONT)  # the gap ends well inside the grace

        job = await stack.wait_settled(job_id, timeout_s=180)

        kinds = types_of(await attempt_events(stack, job_id, 1))
        assert "WorkerUnreachable" in kinds
        assert "WorkerAbandoned" not in kinds
        assert "PreemptionDetected" not in kinds
        assert job["state"] == "done"
        assert job["attempt"] == 1
        assert job["preemptions"] == 0
        assert len(stack.emulator.ledger()) == 1


async def test_hung_worker_is_restarted(tmp_path: Path) -> None:
    # The first attempt's worker waits an hour per step: its heartbeats go on, its step stays.
    command = (f'if [ "$GPUJOBS_ATTEMPT" = 1 ]; then export GPUJOBS_STEP_DELAY_S=3600; fi; '
               f"exec {WORKER}")
    async with live_stack(tmp_path / "home", stall_timeout_s=4.0) as stack:
        stack.start_loop()
        job_id = await stack.submit(command=command, total_steps=150)

        job = await stack.wait_settled(job_id, timeout_s=180)

        first = await attempt_events(stack, job_id, 1)
        kinds = types_of(first)
        assert "WorkerStarted" in kinds
        assert "WorkerStalled" in kinds
        assert kinds.index("WorkerStalled") + 1 == kinds.index("PreemptionDetected")
        preemption = dict(first)["PreemptionDetected"]
        assert preemption["reason"].startswith("worker_error: hung at step 0")
        assert "WorkerStalled" not in types_of(await attempt_events(stack, job_id, 2))
        assert job["state"] == "done"
        assert job["attempt"] == 2
        assert job["restarts"] == 1  # counted against max_restarts
        assert job["preemptions"] == 0
        assert all(row["destroyed_at"] is not None for row in stack.emulator.ledger())


async def test_missing_first_report_restarts(tmp_path: Path) -> None:
    # The first attempt's command runs but never starts a worker, so nothing reports.
    command = f'if [ "$GPUJOBS_ATTEMPT" = 1 ]; then exec sleep 600; fi; exec {WORKER}'
    async with live_stack(tmp_path / "home", first_report_timeout_s=3.0) as stack:
        stack.start_loop()
        job_id = await stack.submit(command=command, total_steps=100)
        failure = await wait_for_event(stack, job_id, "ProvisioningFailed")
        # The next worker imports torch before its first report; give it the usual time.
        stack.supervisor.settings = stack.supervisor.settings.replace(first_report_timeout_s=900.0)

        job = await stack.wait_settled(job_id, timeout_s=180)

        assert failure["attempt"] == 1
        assert failure["reason"].startswith("worker_error: no first report within 3 s")
        kinds = types_of(await attempt_events(stack, job_id, 1))
        assert "WorkerStarted" not in kinds
        assert "InstanceDestroyRequested" in kinds
        assert "InstanceDestroyed" in kinds
        assert job["state"] == "done"
        assert job["attempt"] == 2
        assert job["restarts"] == 1
        ledger = stack.emulator.ledger()
        assert len(ledger) == 2
        assert all(row["destroyed_at"] is not None for row in ledger)


@pytest.mark.parametrize("fault", ["missing", "stale_offline"])
async def test_bad_sweep_recovers_nothing(tmp_path: Path, fault: str) -> None:
    """A sweep that skips a healthy instance, or shows an old status, recovers nothing.

    Every sweep is wrong about the instance until the supervisor reads it with a show call, as
    a long sweep over thousands of instances stays wrong for many ticks.
    """
    async with live_stack(tmp_path / "home") as stack:
        client = stack.client
        real_page = client.list_instances_page
        target: dict[str, int] = {}
        altered: list[int] = []

        def shown() -> bool:
            return stack.emulator.request_count(SHOW_ENDPOINT) > target["shows_before"]

        async def bad_sweep(**kwargs):  # type: ignore[no-untyped-def]
            page, token = await real_page(**kwargs)
            if "id" not in target or kwargs.get("filters") or shown():
                return page, token
            kept = []
            for instance in page:
                if instance.id != target["id"]:
                    kept.append(instance)
                elif fault == "stale_offline":
                    kept.append(dataclasses.replace(instance, actual_status="offline",
                                                    cur_state="offline"))
                altered.append(instance.id)
            return kept, token

        client.list_instances_page = bad_sweep  # type: ignore[method-assign]
        stack.start_loop()
        job_id = await stack.submit(total_steps=400, step_delay_s=0.01)
        instance_id = await wait_for_checkpoint(stack, job_id)
        target["shows_before"] = stack.emulator.request_count(SHOW_ENDPOINT)
        target["id"] = instance_id

        job = await stack.wait_settled(job_id, timeout_s=180)

        assert altered
        assert set(altered) == {instance_id}
        # One show call settled it: the healthy instance went back into the supervisor's view.
        assert stack.emulator.request_count(SHOW_ENDPOINT) - target["shows_before"] == 1
        kinds = types_of(await attempt_events(stack, job_id, 1))
        assert "PreemptionDetected" not in kinds
        assert job["state"] == "done"
        assert job["attempt"] == 1
        assert job["preemptions"] == 0
        assert len(stack.emulator.ledger()) == 1


async def test_offline_instance_is_recovered(tmp_path: Path) -> None:
    async with live_stack(tmp_path / "home") as stack:
        stack.start_loop()
        job_id = await stack.submit(total_steps=300, step_delay_s=0.01)
        instance_id = await wait_for_checkpoint(stack, job_id)
        shows_before = stack.emulator.request_count(SHOW_ENDPOINT)
        await stack.emulator.set_offline(instance_id)

        job = await stack.wait_settled(job_id, timeout_s=180)

        assert stack.emulator.request_count(SHOW_ENDPOINT) - shows_before == 1
        preemption = dict(await attempt_events(stack, job_id, 1))["PreemptionDetected"]
        assert preemption["reason"] == "offline"
        assert preemption["instance_id"] == instance_id
        assert job["state"] == "done"
        assert job["attempt"] == 2
        assert job["preemptions"] == 1


async def test_recovery_held_by_limit_is_queued(tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "limits.yaml").write_text("max_instances: 1\n")
    monkeypatch.setenv("GPUJOBS_CONFIG_DIR", str(config))
    home = tmp_path / "home"
    async with live_stack(home, config_dirs=load_settings(home=home).config_dirs) as stack:
        stack.start_loop()
        low = await stack.submit(name="low", priority=0, total_steps=400, step_delay_s=0.01)
        instance_id = await wait_for_checkpoint(stack, low)
        high = await stack.submit(name="high", priority=5, total_steps=150)
        await stack.emulator.set_offline(instance_id)
        # The freed slot goes to the higher priority job; the preempted one waits in the queue.
        deferred = await wait_for_event(stack, low, "RecoveryDeferred")
        await stack.wait_for(lambda: stack.state(low) == "queued", what="low queued")
        await asyncio.sleep(3 * stack.settings.tick_s)  # let a tick publish the queue
        statuses = {s.job_id: s for s in await list_jobs(stack.settings)}

        done_low = await stack.wait_settled(low, timeout_s=180)
        done_high = await stack.wait_settled(high, timeout_s=180)

        assert deferred["reason"] == "concurrency limit: 1/1 instances alive"
        assert statuses[low].state == "queued"
        assert statuses[low].queue_position == 1
        assert "concurrency limit" in (statuses[low].wait_reason or "")
        assert done_low["state"] == "done"
        assert done_low["attempt"] == 2
        assert done_high["state"] == "done"


async def test_stop_grace_holds_across_restart(tmp_path: Path) -> None:
    """A stop whose worker never responds ends at the grace, counted from before a restart."""
    async with live_stack(tmp_path / "home") as stack:
        stack.start_loop()
        job_id = await stack.submit(total_steps=400, step_delay_s=0.01, grace_period_s=1.0)
        instance_id = await wait_for_checkpoint(stack, job_id)
        os.killpg(worker_group(stack, instance_id), signal.SIGSTOP)  # it never reads the stop request
        await stack.supervisor.stop_job(job_id, "max duration reached")
        await stop_supervisor(stack)
        await asyncio.sleep(1.0 + recovery.PREEMPTION_GRACE_MARGIN_S + 1.0)
        await start_new_supervisor(stack)
        try:
            requested = [e for e in await stack.supervisor.store.read_stream(job_id)
                         if e.type == "StopRequested"]
            rebuilt_at = stack.supervisor.table.runtime_for(job_id).preempted_at

            # The grace ran out while the supervisor was down: one tick destroys the instance.
            await stack.supervisor.tick()
            destroys = [e.data for e in await stack.supervisor.store.read_stream(job_id)
                        if e.type == "InstanceDestroyRequested"]
            stack.start_loop()
            job = await stack.wait_settled(job_id)
        finally:
            await stop_supervisor(stack)

        assert len(requested) == 1
        assert rebuilt_at == requested[0].recorded_at  # the grace's start, from the journal
        assert len(destroys) == 1
        assert destroys[0]["instance_id"] == instance_id
        assert destroys[0]["reason"] == "stopped: max duration reached"
        assert job["state"] == "failed"
        assert job["reason"] == "max duration reached"
        ledger = stack.emulator.ledger()
        assert len(ledger) == 1
        assert ledger[0]["destroyed_at"] is not None


async def test_unlisted_instance_checked_by_show(tmp_path: Path) -> None:
    """Two sweeps without a created instance record nothing while a show call still finds it."""
    async with live_stack(tmp_path / "home") as stack:
        stack.start_loop()
        job_id = await stack.submit(total_steps=400, step_delay_s=0.01)
        instance_id = await wait_for_checkpoint(stack, job_id)
        stack.supervisor.request_stop()
        await asyncio.gather(stack.loop_task, return_exceptions=True)
        stack.loop_task = None
        shows_before = stack.emulator.request_count(SHOW_ENDPOINT)

        for _ in range(3):  # the second missed sweep calls show, which resets the count
            view = reconcile.InstanceView(complete=True)  # a finished sweep that lacks it
            await reconcile._settle_missing(stack.supervisor, view)

        kinds = types_of(await attempt_events(stack, job_id, 1))
        assert "InstanceDestroyed" not in kinds
        assert stack.supervisor.table.live_attempts(job_id)
        assert stack.emulator.request_count(SHOW_ENDPOINT) - shows_before == 1
        assert instance_id in stack.emulator.live_instance_ids()

        # Once the instance is really gone, the same check records the destroy.
        await stack.client.destroy_instance(instance_id)
        for _ in range(2):
            await reconcile._settle_missing(stack.supervisor, reconcile.InstanceView(complete=True))
        kinds = types_of(await attempt_events(stack, job_id, 1))
        assert "InstanceDestroyed" in kinds
