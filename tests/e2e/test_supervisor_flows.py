"""Supervisor flows against the real emulator and real worker processes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gpujobs import jobs
from gpujobs.replay import check_projections
from tests.e2e.harness import live_stack

pytestmark = pytest.mark.timeout(180)


async def test_job_completes_without_preemption(tmp_path: Path) -> None:
    async with live_stack(tmp_path / "home") as stack:
        stack.start_loop()
        job_id = await stack.submit()
        job = await stack.wait_settled(job_id)
        assert job["state"] == "done"
        assert job["attempt"] == 1
        assert job["preemptions"] == 0
        assert stack.supervisor.table.metrics(job_id)["test_accuracy"] > 0.5
        assert stack.emulator.live_instance_ids() == []
        count, differences = await check_projections(stack.supervisor.store)
        assert differences == []


async def test_mailbox_reports_drive_the_job(tmp_path: Path) -> None:
    async with live_stack(tmp_path / "home", report_mode="mailbox") as stack:
        stack.start_loop()
        job_id = await stack.submit(total_steps=150)
        job = await stack.wait_settled(job_id)
        assert job["state"] == "done"
        assert stack.supervisor.reports.reports_received == 0  # nothing came over HTTP
        events = await stack.supervisor.store.read_stream(job_id)
        types = [e.type for e in events]
        assert "WorkerStarted" in types
        assert "CheckpointSaved" in types


async def test_cancel_destroys_the_instance(tmp_path: Path) -> None:
    async with live_stack(tmp_path / "home") as stack:
        stack.start_loop()
        job_id = await stack.submit(total_steps=2000, step_delay_s=0.01)
        await stack.wait_for(lambda: stack.state(job_id) == "running", what="running")
        state = await jobs.cancel(stack.settings, job_id)
        assert state.value == "running"
        job = await stack.wait_settled(job_id)
        assert job["state"] == "cancelled"
        assert stack.emulator.live_instance_ids() == []
        ledger = stack.emulator.ledger()
        assert len(ledger) == 1
        assert ledger[0]["destroyed_at"] is not None


async def test_cancel_while_queued_rents_nothing(tmp_path: Path) -> None:
    async with live_stack(tmp_path / "home") as stack:
        job_id = await stack.submit()
        await jobs.cancel(stack.settings, job_id)
        stack.start_loop()
        job = await stack.wait_settled(job_id)
        assert job["state"] == "cancelled"
        assert stack.emulator.ledger() == []


async def test_crashing_worker_fails_after_max_restarts(tmp_path: Path) -> None:
    async with live_stack(tmp_path / "home") as stack:
        stack.start_loop()
        job_id = await stack.submit(command="exit 3")
        job = await stack.wait_settled(job_id, timeout_s=120)
        assert job["state"] == "failed"
        assert "max_restarts" in job["reason"]
        assert stack.emulator.live_instance_ids() == []
        # The profile allows 3 restarts, so 4 workers ran and each exit counted once.
        assert len(stack.emulator.ledger()) == 4


async def test_completed_job_is_not_run_again(tmp_path: Path) -> None:
    home = tmp_path / "home"
    async with live_stack(home) as stack:
        stack.start_loop()
        job_id = await stack.submit(total_steps=100)
        await stack.wait_settled(job_id)
        marker = await stack.supervisor.completion_marker(job_id)
        assert marker is not None
    async with live_stack(home) as stack:
        stack.start_loop()
        second = await stack.submit(total_steps=100)
        await stack.wait_settled(second)
        # The first job stays done and rents nothing more after the restart.
        assert stack.state(job_id) in (None, "done")
        labels = [row["label"] for row in stack.emulator.ledger()]
        assert all(job_id not in label for label in labels)


async def test_marker_completes_job_without_report(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="gpujobs")
    async with live_stack(tmp_path / "home") as stack:
        stack.start_loop()
        job_id = await stack.submit(total_steps=300, step_delay_s=0.01)
        await stack.wait_for(lambda: stack.state(job_id) == "running", what="running")
        # From here on no report reaches the supervisor: the worker finishes, writes its
        # completion marker, and exits, and the journal still has the job running.
        await stack.supervisor.reports.stop()
        await stack.wait_for(lambda: stack.emulator.ledger()[0]["status"] != "running",
                             what="the worker to exit")
        # The next tick may already have seen the exit, so the state is not checked here; the
        # log line below shows that the marker, not a report, completed the job.

        job = await stack.wait_settled(job_id)
        assert job["state"] == "done"
        assert job["step"] == 300
        assert f"job {job_id}: completion marker found" in caplog.text
        [instance] = stack.emulator.ledger()  # nothing rented for a second attempt
        assert instance["destroyed_at"] is not None
        types = [e.type for e in await stack.supervisor.store.read_stream(job_id)]
        assert types.count("OfferSelected") == 1
        assert "JobCompleted" in types
        assert "PreemptionDetected" not in types
