"""Creates and destroys against an emulator that holds, fails or drops chosen requests."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpujobs import events as ev
from gpujobs import jobs
from gpujobs.replay import check_projections
from tests.e2e import harness
from tests.e2e.scripted_emulator import CREATE, DESTROY, ScriptedEmulator

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(autouse=True)
def scripted(monkeypatch) -> None:
    monkeypatch.setattr(harness, "Emulator", ScriptedEmulator)


async def stream_types(stack: harness.Stack, stream: str) -> list[str]:
    return [e.type for e in await stack.supervisor.store.read_stream(stream)]


async def test_cancel_during_create_destroys_it(tmp_path: Path) -> None:
    async with harness.live_stack(tmp_path / "home") as stack:
        emulator: ScriptedEmulator = stack.emulator  # type: ignore[assignment]
        emulator.reply_delays_s[CREATE] = 3.0  # the instance exists; the reply is late
        job_id = await stack.submit(total_steps=2000, step_delay_s=0.01)
        stack.start_loop()
        await emulator.arrived[CREATE].wait()
        await jobs.cancel(stack.settings, job_id)  # appended while the create call runs

        job = await stack.wait_settled(job_id)
        assert job["state"] == "cancelled"
        [instance] = emulator.ledger()
        assert instance["destroyed_at"] is not None
        assert stack.emulator.live_instance_ids() == []
        events = await stack.supervisor.store.read_stream(job_id)
        types = [e.type for e in events]
        assert types.index("CancelRequested") < types.index("InstanceCreated")
        [created] = [e for e in events if e.type == "InstanceCreated"]
        assert created.data["instance_id"] == instance["id"]
        assert created.data["adopted"] is False  # recorded from the reply, not found later
        assert "InstanceDestroyed" in types
        count, differences = await check_projections(stack.supervisor.store)
        assert differences == []


async def test_accepted_destroy_is_resent_if_listed(tmp_path: Path) -> None:
    async with harness.live_stack(tmp_path / "home") as stack:
        emulator: ScriptedEmulator = stack.emulator  # type: ignore[assignment]
        stack.supervisor.destroy_resend_s = 1.0
        emulator.dropped[DESTROY] = 1  # accepted, but the instance stays
        job_id = await stack.submit(total_steps=2000, step_delay_s=0.01)
        stack.start_loop()
        await stack.wait_for(lambda: stack.state(job_id) == "running", what="running")
        await jobs.cancel(stack.settings, job_id)

        job = await stack.wait_settled(job_id)
        assert job["state"] == "cancelled"
        assert emulator.calls[DESTROY] == 2
        assert stack.emulator.live_instance_ids() == []
        types = await stream_types(stack, job_id)
        assert types.count("InstanceDestroyRequested") == 2
        assert types.count("InstanceDestroyed") == 1


async def create_stray(stack: harness.Stack, label: str) -> int:
    [offer, *_] = await stack.client.search_offers({"rentable": {"eq": True}})
    return await stack.client.create_instance(offer.id, image="stray:latest", onstart="sleep 300",
                                              label=label)


async def test_stray_destroy_is_journaled(tmp_path: Path) -> None:
    async with harness.live_stack(tmp_path / "home") as stack:
        emulator: ScriptedEmulator = stack.emulator  # type: ignore[assignment]
        label = "gpujobs:ghost-0a1b2c:1"
        stray_id = await create_stray(stack, label)
        # The client tries each request 5 times, so 10 failures fail two DELETEs of the
        # supervisor, and the third one goes through after its backoff.
        emulator.failures[DESTROY] = 10
        stack.start_loop()
        await stack.wait_for(lambda: stack.emulator.live_instance_ids() == [],
                             what="the stray destroyed")
        await stack.wait_for(lambda: not stack.supervisor.strays.pending,
                             what="the stray recorded as destroyed")

        events = await stack.supervisor.store.read_stream(ev.SUPERVISOR_STREAM)
        types = [e.type for e in events]
        assert types == ["StrayDestroyRequested", "StrayDestroyFailed",
                         "StrayDestroyRequested", "StrayDestroyRequested", "StrayDestroyed"]
        assert all(e.data["instance_id"] == stray_id for e in events)
        assert all(e.data["label"] == label for e in events)
        failed = events[1].data
        assert "scripted failure" in failed["message"]
        assert failed["retry_in_s"] == 2.0
        assert emulator.calls[DESTROY] == 11
        # The supervisor's stream is not a job.
        assert stack.job(ev.SUPERVISOR_STREAM) is None
        count, differences = await check_projections(stack.supervisor.store)
        assert differences == []


async def test_pending_stray_settled_after_restart(tmp_path: Path) -> None:
    home = tmp_path / "home"
    async with harness.live_stack(home) as stack:
        emulator: ScriptedEmulator = stack.emulator  # type: ignore[assignment]
        emulator.dropped[DESTROY] = 1  # accepted, but the instance stays listed
        stray_id = await create_stray(stack, "gpujobs:ghost-0a1b2c:1")
        stack.start_loop()
        await stack.wait_for(lambda: emulator.calls[DESTROY] == 1, what="a DELETE")
        stack.supervisor.request_stop()
        await stack.loop_task
        assert await stream_types(stack, ev.SUPERVISOR_STREAM) == ["StrayDestroyRequested"]
    # A new emulator lists nothing: the stray went away while no supervisor ran. The intent
    # is read back at start, and the sweeps that miss the instance record the outcome.
    async with harness.live_stack(home) as stack:
        assert list(stack.supervisor.strays.pending) == [stray_id]
        stack.start_loop()
        await stack.wait_for(lambda: not stack.supervisor.strays.pending,
                             what="the stray recorded as destroyed")
        types = await stream_types(stack, ev.SUPERVISOR_STREAM)
        assert types == ["StrayDestroyRequested", "StrayDestroyed"]


async def test_second_instance_with_label_destroyed(tmp_path: Path) -> None:
    async with harness.live_stack(tmp_path / "home") as stack:
        stack.start_loop()
        job_id = await stack.submit(total_steps=600, step_delay_s=0.01)
        await stack.wait_for(lambda: stack.state(job_id) == "running", what="running")
        own_id = stack.job(job_id)["instance_id"]
        # Another instance appears under the running attempt's label.
        extra_id = await create_stray(stack, f"gpujobs:{job_id}:1")
        await stack.wait_for(lambda: extra_id not in stack.emulator.live_instance_ids(),
                             what="the second instance destroyed")
        assert own_id in stack.emulator.live_instance_ids()

        job = await stack.wait_settled(job_id)
        assert job["state"] == "done"
        assert job["preemptions"] == 0
        assert job["attempt"] == 1
        events = await stack.supervisor.store.read_stream(ev.SUPERVISOR_STREAM)
        assert {e.data["instance_id"] for e in events} == {extra_id}
        [created] = [e for e in await stack.supervisor.store.read_stream(job_id)
                     if e.type == "InstanceCreated"]
        assert created.data["instance_id"] == own_id
