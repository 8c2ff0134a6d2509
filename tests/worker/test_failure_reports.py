"""Worker failure reports on the supervisor side: which failures end a job for good."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpujobs import events as ev
from gpujobs.projections import WORKER_ERROR
from gpujobs.supervisor.reporting import derive_events
from tests.e2e.harness import live_stack
from worker import protocol
from worker.checkpoint_store import write_checkpoint
from worker.protocol import Report, ReportKind
from worker.storage import open_storage

pytestmark = pytest.mark.timeout(180)


def running_job() -> dict:
    return {
        "job_id": "job-1", "state": "running", "attempt": 2, "instance_id": 7,
        "resumed_from_step": None, "last_checkpoint_step": 50,
    }  # fmt: skip


def failed_report(error: str, exit_code: int | None) -> Report:
    return Report(
        job_id="job-1", attempt=2, kind=ReportKind.FAILED, step=60, total_steps=200,
        sent_at=1.0, error=error, exit_code=exit_code,
    )  # fmt: skip


def test_bad_checkpoint_exit_code_fails_job() -> None:
    report = failed_report("checkpoint at step 50 cannot be loaded", protocol.EXIT_BAD_CHECKPOINT)

    events = derive_events(running_job(), report)

    assert [type(event) for event in events] == [ev.JobFailed]
    assert "cannot be loaded" in events[0].reason
    assert events[0].attempt == 2


def test_storage_error_on_checkpoint_key_is_retried() -> None:
    error = (
        "artifact storage failed: cannot get s3://bucket/job-1/checkpoints/step-000000000050/"
        "payload.pt: read timed out"
    )
    report = failed_report(error, protocol.EXIT_FAILED)

    events = derive_events(running_job(), report)

    assert [type(event) for event in events] == [ev.PreemptionDetected]
    assert events[0].reason.startswith(WORKER_ERROR)
    assert events[0].last_checkpoint_step == 50


def test_failure_without_exit_code_is_retried() -> None:
    report = failed_report("checkpoint upload failed", None)

    events = derive_events(running_job(), report)

    assert [type(event) for event in events] == [ev.PreemptionDetected]


def test_report_exit_code_roundtrip() -> None:
    report = failed_report("boom", protocol.EXIT_BAD_CHECKPOINT)

    parsed = Report.from_dict(json.loads(report.to_json()))

    assert parsed.exit_code == protocol.EXIT_BAD_CHECKPOINT
    assert Report.from_dict({**parsed.__dict__, "exit_code": None}).exit_code is None


async def test_unloadable_checkpoint_fails_job_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    async with live_stack(home) as stack:
        job_id = await stack.submit(total_steps=100)
        storage = open_storage(f"{stack.settings.artifact_root.rstrip('/')}/{job_id}")
        await write_checkpoint(storage, 50, b"not a torch file")
        stack.start_loop()

        job = await stack.wait_settled(job_id)
        events = await stack.supervisor.store.read_stream(job_id)

    types = [event.type for event in events]
    assert job["state"] == "failed"
    assert job["attempt"] == 1
    assert types.count("JobFailed") == 1
    assert "PreemptionDetected" not in types
    failed = next(event for event in events if event.type == "JobFailed")
    assert "cannot be loaded" in failed.data["reason"]
