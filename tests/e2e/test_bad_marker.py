"""A damaged completion marker in storage neither crashes the supervisor nor stalls its job."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from journal import verify_file
from tests.e2e.harness import live_stack
from worker.protocol import COMPLETION_MARKER

# Each of these makes the supervisor ignore the marker and run the job.
IGNORED = {
    "garbage": "xx",
    "infinite step": '{"job_id": "JOB", "attempt": 1, "step": Infinity, "completed_at": 1.0}',
    "huge step": json.dumps({"job_id": "JOB", "attempt": 1, "step": 10**29,
                             "completed_at": 1.0, "metrics": {}}),
    "negative step": json.dumps({"job_id": "JOB", "attempt": 1, "step": -1,
                                 "completed_at": 1.0, "metrics": {}}),
    "other job": json.dumps({"job_id": "other-000000", "attempt": 1, "step": 5,
                             "completed_at": 1.0, "metrics": {}}),
    "not an object": "[1, 2]",
}


def write_marker(home: Path, job_id: str, text: str) -> None:
    folder = home / "artifacts" / job_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / COMPLETION_MARKER).write_text(text.replace("JOB", job_id))


async def test_invalid_markers_are_ignored(tmp_path: Path, caplog) -> None:
    home = tmp_path / "home"
    caplog.set_level(logging.WARNING, logger="gpujobs.supervisor.core")
    async with live_stack(home) as stack:
        for case, text in IGNORED.items():
            job_id = await stack.submit()
            write_marker(home, job_id, text)
            assert await stack.supervisor.completion_marker(job_id) is None, case
            assert await stack.supervisor.completion_marker(job_id) is None, case
            warnings = [r.getMessage() for r in caplog.records if job_id in r.getMessage()]
            assert len(warnings) == 1, (case, warnings)
            assert "ignoring its completion marker" in warnings[0]


async def test_valid_marker_completes_job(tmp_path: Path) -> None:
    home = tmp_path / "home"
    async with live_stack(home) as stack:
        job_id = await stack.submit()
        # A diverged loss is written as NaN; it is dropped, and the marker still counts.
        write_marker(home, job_id, '{"job_id": "JOB", "attempt": 1, "step": 40, '
                                   '"completed_at": 1.0, "metrics": {"loss": NaN, "acc": 0.5}}')
        marker = await stack.supervisor.completion_marker(job_id)
        assert marker is not None
        assert marker.step == 40
        assert marker.metrics == {"acc": 0.5}

        # The job ends done from the marker alone and rents nothing.
        stack.start_loop()
        await stack.wait_settled(job_id, timeout_s=30)
        assert stack.state(job_id) == "done"
        events = await stack.supervisor.store.read_stream(job_id)
        completed = [e for e in events if e.type == "JobCompleted"]
        assert [e.data["metrics"] for e in completed] == [{"acc": 0.5}]
        assert not [e for e in events if e.type == "InstanceRequested"]
    assert verify_file(home / "journal.db").ok


@pytest.mark.parametrize("case", ["garbage", "huge step", "infinite step"])
async def test_job_with_bad_marker_still_provisions(tmp_path: Path, case: str) -> None:
    home = tmp_path / "home"
    async with live_stack(home) as stack:
        job_id = await stack.submit()
        write_marker(home, job_id, IGNORED[case])
        stack.start_loop()
        await stack.wait_for(lambda: stack.state(job_id) not in (None, "queued"), timeout_s=30,
                             what="the job to leave queued")
        events = await stack.supervisor.store.read_stream(job_id)
        assert "InstanceRequested" in [e.type for e in events]
        assert not stack.loop_task.done()
