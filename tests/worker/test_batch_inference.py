"""Batch inference: the shard bookkeeping, and the real infer-digits process preempted by SIGTERM
while it runs a model trained by the real train-digits process."""

from __future__ import annotations

import asyncio
import io
import json
import signal
from pathlib import Path

import pytest
import torch

from tests.worker.processes import WorkerProcess, run_worker, worker_env
from worker import protocol
from worker.batch_inference import finished_from_state, inference_state, stored_output_shards
from worker.checkpoint_store import load_latest_checkpoint
from worker.datasets import FILES_DIR, MANIFEST_KEY, DatasetManifest, scan_files
from worker.storage import LocalStorage
from worker.train_digits import build_model

SHARDS = 10
FINISHED = r"shard (\d+) finished"
TRAINING_STEPS = 300


def write_model(path: Path) -> None:
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_model().state_dict(), path)


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train the digits model with the worker's own entry point; return final/model.pt."""
    store = tmp_path_factory.mktemp("training") / "store"
    env = worker_env(store, GPUJOBS_TOTAL_STEPS=str(TRAINING_STEPS), GPUJOBS_CHECKPOINT_EVERY="100")
    worker = run_worker(["train-digits"], env)
    assert worker.process.returncode == protocol.EXIT_OK, worker.output()
    return store / "final/model.pt"


def overall_accuracy(store: Path, shards: list[int]) -> float:
    results = [output(store, shard) for shard in shards]
    correct = sum(result["accuracy"] * result["count"] for result in results)
    return correct / sum(result["count"] for result in results)


def finished_shards(worker: WorkerProcess) -> list[int]:
    return [int(match.group(1)) for match in worker.find(FINISHED)]


def output(store: Path, shard: int) -> dict:
    return json.loads((store / protocol.shard_output_key(shard)).read_text())


def checkpointed_shards(store: Path) -> list[int]:
    found = asyncio.run(load_latest_checkpoint(LocalStorage(store)))
    assert found is not None
    state = torch.load(io.BytesIO(found[1]), weights_only=True)
    return state["finished"]


def test_stored_output_shards() -> None:
    keys = ["outputs/shard-0.json", "outputs/shard-12.json", "outputs/shard-x.json",
            "outputs/other.json", "logs/attempt-1.log"]  # fmt: skip

    assert stored_output_shards(keys) == {0, 12}


def test_state_roundtrip_and_mismatch() -> None:
    state = inference_state(4, {3, 1})

    assert state["finished"] == [1, 3]
    assert finished_from_state(state, 4) == {1, 3}
    with pytest.raises(ValueError, match="covers 4 shards, this job has 5"):
        finished_from_state(state, 5)
    with pytest.raises(ValueError, match="not a batch inference state"):
        finished_from_state({"kind": "training"}, 4)


def test_preempted_inference_resumes_without_redoing(
    tmp_path: Path, trained_model: Path
) -> None:
    store = tmp_path / "store"
    env = dict(GPUJOBS_MODEL_URI=f"file://{trained_model}", GPUJOBS_INFER_SHARDS=str(SHARDS))
    first = WorkerProcess(["infer-digits"], worker_env(store, GPUJOBS_STEP_DELAY_S="0.3", **env))
    try:
        first.wait_for_line(r"shard 2 finished")
        first.process.send_signal(signal.SIGTERM)
        first.wait(60)
    finally:
        first.kill()

    assert first.process.returncode == protocol.EXIT_PREEMPTED, first.output()
    done_first = finished_shards(first)
    assert done_first == list(range(len(done_first)))
    assert len(done_first) < SHARDS
    assert checkpointed_shards(store) == done_first
    written = {shard: (store / protocol.shard_output_key(shard)).stat().st_mtime_ns
               for shard in done_first}  # fmt: skip

    # An output stored just before a kill, whose shard the checkpoint does not list yet.
    unrecorded = len(done_first)
    (store / protocol.shard_output_key(unrecorded)).write_text(
        json.dumps({"shard": unrecorded, "count": 0, "predictions": []})
    )
    second = run_worker(["infer-digits"], worker_env(store, attempt=2, **env))

    assert second.process.returncode == protocol.EXIT_OK, second.output()
    done_second = finished_shards(second)
    assert sorted(done_first + [unrecorded] + done_second) == list(range(SHARDS))
    assert f"{unrecorded + 1} of {SHARDS} shards already finished" in second.output()
    for shard, mtime_ns in written.items():
        assert (store / protocol.shard_output_key(shard)).stat().st_mtime_ns == mtime_ns
    counts = [output(store, shard)["count"] for shard in done_first + done_second]
    assert sum(counts) == 360 - 36  # 360 held-out digits in 10 shards; one was not computed
    # The trained model classifies the held-out digits; an untrained one is near 0.1.
    assert overall_accuracy(store, done_first + done_second) >= 0.9
    marker = protocol.CompletionMarker.from_json((store / protocol.COMPLETION_MARKER).read_bytes())
    assert marker.step == SHARDS
    assert not (store / "final/model.pt").exists()


def push_dataset_by_hand(root: Path, folder: Path) -> str:
    """Store folder as a dataset under root, the layout `gpujobs data push` writes."""
    scanned = scan_files(folder)
    manifest = DatasetManifest(tuple(item for _, item in scanned))
    target = root / protocol.DATASETS_DIR / manifest.digest
    for local, item in scanned:
        (target / FILES_DIR / item.path).parent.mkdir(parents=True, exist_ok=True)
        (target / FILES_DIR / item.path).write_bytes(local.read_bytes())
    (target / MANIFEST_KEY).write_text(manifest.to_json())
    return f"file://{root}/{protocol.DATASETS_DIR}/{manifest.digest}"


def test_inference_over_dataset_with_job_model(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for shard in range(3):
        rows = slice(shard * 5, shard * 5 + 5)
        content = {"inputs": digits.data[rows].tolist(), "labels": digits.target[rows].tolist()}
        (inputs / f"shard-{shard}.json").write_text(json.dumps(content))
    uri = push_dataset_by_hand(tmp_path / "artifacts", inputs)
    store = tmp_path / "store"
    write_model(store / "final/model.pt")
    env = worker_env(store, GPUJOBS_DATASET_URI=uri, GPUJOBS_CACHE_DIR=str(tmp_path / "cache"))

    worker = run_worker(["infer-digits"], env)

    assert worker.process.returncode == protocol.EXIT_OK, worker.output()
    assert finished_shards(worker) == [0, 1, 2]
    assert [output(store, shard)["count"] for shard in range(3)] == [5, 5, 5]
    assert (tmp_path / "cache" / protocol.DATASETS_DIR).is_dir()


def test_inference_without_model_fails_clearly(tmp_path: Path) -> None:
    worker = run_worker(["infer-digits"], worker_env(tmp_path / "store"))

    assert worker.process.returncode == protocol.EXIT_BAD_CONFIG
    assert "cannot start inference" in worker.output()
    assert "final/model.pt" in worker.output()
