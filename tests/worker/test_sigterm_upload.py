"""SIGTERM while a checkpoint upload is in flight, against a moto server behind a slow proxy.

Whatever the timing, the latest checkpoint afterwards must verify: either the new one is
complete or an earlier one stays latest, and the next attempt resumes from it.
"""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.worker.conftest import DUMMY_CREDENTIALS, make_s3_storage
from tests.worker.processes import WorkerProcess, run_worker, worker_env
from tests.worker.slow_proxy import SlowProxy
from worker import protocol
from worker.checkpoint_store import list_checkpoints, load_latest_checkpoint

pytestmark = pytest.mark.timeout(180)

DURABLE = r"checkpoint at step (\d+) durable"
STOPPING = r"stopping at step (\d+)"
# A digits checkpoint is about 230 kB, so one upload took about 1.7 s through the proxy.
PROXY_BYTES_PER_S = 128 * 1024


@pytest.fixture
def slow_url(moto_url: str) -> Iterator[str]:
    proxy = SlowProxy(urlparse(moto_url).port, PROXY_BYTES_PER_S)
    yield proxy.start()
    proxy.stop()


def s3_worker_env(tmp_path: Path, endpoint: str, bucket: str, attempt: int = 1,
                  **overrides: str) -> dict[str, str]:
    settings = {
        "GPUJOBS_ARTIFACT_URI": f"s3://{bucket}/job-test",
        "GPUJOBS_S3_ENDPOINT_URL": endpoint, "GPUJOBS_S3_PATH_STYLE": "1",
        "GPUJOBS_TOTAL_STEPS": "3000", "GPUJOBS_CHECKPOINT_EVERY": "25",
        "GPUJOBS_STEP_DELAY_S": "0.02", "GPUJOBS_HEARTBEAT_INTERVAL_S": "1",
        **DUMMY_CREDENTIALS,
    }  # fmt: skip
    return worker_env(tmp_path / "unused", attempt=attempt, **{**settings, **overrides})


def stored_checkpoints(moto_url: str, bucket: str) -> tuple[int | None, list[int]]:
    """Return the latest verified step and every step that has a manifest."""

    async def read() -> tuple[int | None, list[int]]:
        storage = make_s3_storage(moto_url, bucket, prefix="job-test")
        try:
            found = await load_latest_checkpoint(storage)
            listed = await list_checkpoints(storage)
        finally:
            await storage.close()
        return (found[0].step if found else None), [item.step for item in listed]

    return asyncio.run(read())


def durable_after_stop(worker: WorkerProcess) -> list[int]:
    """Return the steps that became durable after the worker logged that it is stopping."""
    lines = worker.lines
    stop_index = next(i for i, line in enumerate(lines) if re.search(STOPPING, line))
    return [int(m.group(1)) for line in lines[stop_index:] if (m := re.search(DURABLE, line))]


def sigterm_during_upload(env: dict[str, str], delay_s: float) -> WorkerProcess:
    worker = WorkerProcess(["train-digits"], env)
    try:
        worker.wait_for_line(DURABLE, timeout_s=90)
        asyncio.run(asyncio.sleep(delay_s))
        worker.process.send_signal(signal.SIGTERM)
        worker.wait(90)
    finally:
        worker.kill()
    return worker


@pytest.mark.parametrize("delay_s", [0.0, 0.3, 0.9, 1.6])
def test_sigterm_during_upload_keeps_valid_latest(
    tmp_path: Path, moto_url: str, slow_url: str, s3_bucket: str, delay_s: float
) -> None:
    env = s3_worker_env(tmp_path, slow_url, s3_bucket, GPUJOBS_GRACE_PERIOD_S="20")

    worker = sigterm_during_upload(env, delay_s)

    assert worker.process.returncode == protocol.EXIT_PREEMPTED, worker.output()
    stopped = int(worker.wait_for_line(STOPPING).group(1))
    durable = [int(match.group(1)) for match in worker.find(DURABLE)]
    latest, listed = stored_checkpoints(moto_url, s3_bucket)
    # The signal met an upload in flight (it finished before the emergency one) or a pending
    # snapshot (the emergency checkpoint replaced it).
    finished_after_stop = durable_after_stop(worker)
    superseded = worker.find(rf"superseded by step {stopped} ")
    assert finished_after_stop[:-1] or superseded, worker.output()
    assert finished_after_stop[-1] == stopped
    assert latest == stopped, worker.output()
    assert latest == max(durable)
    assert latest == max(listed)

    resumed = run_worker(["train-digits"], s3_worker_env(
        tmp_path, moto_url, s3_bucket, attempt=2, GPUJOBS_TOTAL_STEPS=str(stopped + 10),
    ))  # fmt: skip

    assert resumed.process.returncode == protocol.EXIT_OK, resumed.output()
    assert f"resumed from step {stopped}" in resumed.output()


@pytest.mark.parametrize("delay_s", [0.0, 0.9])
def test_short_grace_skips_emergency_checkpoint(
    tmp_path: Path, moto_url: str, slow_url: str, s3_bucket: str, delay_s: float
) -> None:
    # The grace period minus the stop reserve is shorter than the last upload took.
    env = s3_worker_env(tmp_path, slow_url, s3_bucket, GPUJOBS_GRACE_PERIOD_S="2")

    worker = sigterm_during_upload(env, delay_s)

    assert worker.process.returncode == protocol.EXIT_PREEMPTED, worker.output()
    stopped = int(worker.wait_for_line(STOPPING).group(1))
    assert worker.find(rf"no time for an emergency checkpoint at step {stopped}"), worker.output()
    durable = [int(match.group(1)) for match in worker.find(DURABLE)]
    latest, listed = stored_checkpoints(moto_url, s3_bucket)
    assert latest is not None
    assert latest < stopped
    # The previous checkpoint, or one whose upload was in flight and completed in time.
    assert latest == max(durable), worker.output()
    assert stopped not in listed
