"""The real `gpujobs-worker train-digits` process: signals, resume, completion, determinism."""

from __future__ import annotations

import asyncio
import io
import json
import random
import signal
from pathlib import Path

import pytest
import torch

from tests.worker.processes import WorkerProcess, run_worker, worker_env
from worker import protocol
from worker.checkpoint_store import find_latest_checkpoint, list_checkpoints
from worker.storage import LocalStorage

DURABLE = r"checkpoint at step (\d+) durable"
STOPPING = r"stopping at step (\d+)"
STARTED = r"started at step (\d+) of \d+ \((.*)\)"


def latest_step(store: Path) -> int | None:
    ref = asyncio.run(find_latest_checkpoint(LocalStorage(store)))
    return ref.step if ref else None


def final_weights(store: Path) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO((store / "final/model.pt").read_bytes()), weights_only=True)


def mailbox(store: Path) -> protocol.Report:
    return protocol.Report.from_dict(json.loads((store / protocol.MAILBOX_KEY).read_text()))


def preempt_after_first_checkpoint(store: Path, sig: signal.Signals) -> WorkerProcess:
    worker = WorkerProcess(["train-digits"], worker_env(store, GPUJOBS_STEP_DELAY_S="0.01"))
    try:
        worker.wait_for_line(DURABLE)
        worker.wait_for_line(r"step 50/200")
        asyncio.run(asyncio.sleep(random.uniform(0.05, 0.6)))
        worker.process.send_signal(sig)
        worker.wait(60)
    finally:
        worker.kill()
    return worker


def test_sigterm_writes_emergency_checkpoint(tmp_path: Path) -> None:
    store = tmp_path / "store"
    worker = preempt_after_first_checkpoint(store, signal.SIGTERM)

    assert worker.process.returncode == protocol.EXIT_PREEMPTED, worker.output()
    stopped = [int(match.group(1)) for match in worker.find(STOPPING)]
    assert len(stopped) == 1
    assert 50 <= stopped[0] < 200
    assert latest_step(store) == stopped[0]
    assert "received SIGTERM" in worker.output()
    assert (store / protocol.attempt_log_key(1)).read_text().count("stopping at step") == 1
    assert (store / protocol.attempt_metrics_key(1)).read_text().count("\n") == stopped[0]
    assert mailbox(store).last_checkpoint.step == stopped[0]

    resumed = run_worker(["train-digits"], worker_env(store, attempt=2))

    assert resumed.process.returncode == protocol.EXIT_OK, resumed.output()
    start = resumed.find(STARTED)
    assert [int(start[0].group(1))] == stopped
    assert start[0].group(2) == f"resumed from step {stopped[0]}"
    metrics = json.loads((store / "final/metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.95
    marker = protocol.CompletionMarker.from_json((store / protocol.COMPLETION_MARKER).read_bytes())
    assert marker.attempt == 2
    assert marker.step == 200
    report = mailbox(store)
    assert report.kind is protocol.ReportKind.COMPLETED
    assert report.resumed_from_step == stopped[0]


def test_sigint_stops_like_sigterm(tmp_path: Path) -> None:
    store = tmp_path / "store"
    worker = preempt_after_first_checkpoint(store, signal.SIGINT)

    assert worker.process.returncode == protocol.EXIT_PREEMPTED, worker.output()
    assert "received SIGINT" in worker.output()
    assert latest_step(store) == int(worker.find(STOPPING)[0].group(1))


def test_sigkill_loses_only_steps_since_checkpoint(tmp_path: Path) -> None:
    store = tmp_path / "store"
    worker = WorkerProcess(["train-digits"], worker_env(store, GPUJOBS_STEP_DELAY_S="0.01"))
    try:
        worker.wait_for_line(r"checkpoint at step 100 durable")
        asyncio.run(asyncio.sleep(random.uniform(0.0, 0.4)))
        worker.process.kill()
        worker.wait(30)
    finally:
        worker.kill()
    durable = [int(match.group(1)) for match in worker.find(DURABLE)]

    resumed = run_worker(["train-digits"], worker_env(store, attempt=2))

    assert resumed.process.returncode == protocol.EXIT_OK, resumed.output()
    start_step = int(resumed.find(STARTED)[0].group(1))
    assert start_step == max(durable)
    assert start_step >= 100


def test_resumed_run_matches_uninterrupted_bitwise(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    interrupted = tmp_path / "interrupted"
    first = run_worker(["train-digits"], worker_env(straight))
    stopped = preempt_after_first_checkpoint(interrupted, signal.SIGTERM)
    resumed = run_worker(["train-digits"], worker_env(interrupted, attempt=2))

    assert first.process.returncode == protocol.EXIT_OK, first.output()
    assert stopped.process.returncode == protocol.EXIT_PREEMPTED, stopped.output()
    assert resumed.process.returncode == protocol.EXIT_OK, resumed.output()
    expected, actual = final_weights(straight), final_weights(interrupted)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_completed_job_is_not_trained_again(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = run_worker(["train-digits"], worker_env(store, GPUJOBS_TOTAL_STEPS="60"))
    marker_before = (store / protocol.COMPLETION_MARKER).read_bytes()

    again = run_worker(["train-digits"], worker_env(store, attempt=2, GPUJOBS_TOTAL_STEPS="60"))

    assert first.process.returncode == protocol.EXIT_OK, first.output()
    assert again.process.returncode == protocol.EXIT_OK, again.output()
    assert "already completed" in again.output()
    assert not again.find(STARTED)
    assert (store / protocol.COMPLETION_MARKER).read_bytes() == marker_before
    assert mailbox(store).kind is protocol.ReportKind.COMPLETED
    assert mailbox(store).attempt == 2


def test_unloadable_checkpoint_exits_bad_checkpoint(tmp_path: Path) -> None:
    from worker.checkpoint_store import write_checkpoint

    store = tmp_path / "store"
    asyncio.run(write_checkpoint(LocalStorage(store), 50, b"not a torch file"))

    worker = run_worker(["train-digits"], worker_env(store))

    assert worker.process.returncode == protocol.EXIT_BAD_CHECKPOINT, worker.output()
    report = mailbox(store)
    assert report.kind is protocol.ReportKind.FAILED
    assert "step 50" in report.error
    assert "cannot be loaded" in report.error


def test_keeps_last_three_checkpoints(tmp_path: Path) -> None:
    store = tmp_path / "store"
    env = worker_env(store, GPUJOBS_TOTAL_STEPS="260", GPUJOBS_CHECKPOINT_EVERY="20")

    worker = run_worker(["train-digits"], env)

    assert worker.process.returncode == protocol.EXIT_OK, worker.output()
    steps = [item.step for item in asyncio.run(list_checkpoints(LocalStorage(store)))]
    # A checkpoint still waiting for its upload is superseded by the next one, so on a busy
    # machine 200 or 220 may never be written. The newest three that were written are kept.
    assert len(steps) == 3
    assert steps[0] == 240
    assert steps == sorted(steps, reverse=True)
    assert all(step % 20 == 0 for step in steps)


@pytest.mark.parametrize(
    ("name", "value"),
    [("GPUJOBS_TOTAL_STEPS", "many"), ("GPUJOBS_ARTIFACT_URI", ""), ("GPUJOBS_ATTEMPT", "0")],
)
def test_bad_config_exits_78(tmp_path: Path, name: str, value: str) -> None:
    worker = run_worker(["train-digits"], worker_env(tmp_path / "store", **{name: value}))

    assert worker.process.returncode == protocol.EXIT_BAD_CONFIG
    assert name in worker.output()


def test_unwritable_storage_fails_fast(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")

    worker = run_worker(["train-digits"], worker_env(blocker / "store"))

    assert worker.process.returncode == protocol.EXIT_FAILED
    assert "artifact storage unavailable" in worker.output()
