"""Example batch inference job: the trained digits model over shards of inputs.

The model is the state_dict stored by train-digits (final/model.pt). It comes from
$GPUJOBS_MODEL_URI (an object URI, file:// or s3://) or else from final/model.pt under the
job's own prefix. Inputs are the digits held-out split cut into $GPUJOBS_INFER_SHARDS shards
(default 8), or, with $GPUJOBS_DATASET_URI, the files shard-<N>.json of that dataset, each
{"inputs": [[64 pixel values 0-16], ...]} with optional "labels". Each shard's predictions go
to outputs/shard-<N>.json.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker import protocol
from worker.artifacts import FINAL_MODEL_KEY
from worker.batch_inference import run_batch_inference
from worker.errors import ConfigError
from worker.storage import ObjectNotFound, open_storage
from worker.train_digits import build_model, load_digits_data

logger = logging.getLogger(__name__)

ENV_INFER_SHARDS = "GPUJOBS_INFER_SHARDS"
DEFAULT_SHARDS = 8
MODEL_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class InputShard:
    """Standardized features of one shard, with labels when they are known."""

    features: torch.Tensor
    labels: torch.Tensor | None


def run_inference_job(session: Any) -> int:
    """Load the model and inputs, then run the resumable shard loop; return the exit code."""
    try:
        shards = load_input_shards(os.environ, torch.device("cpu"))
        model = load_model(session)
    except (ConfigError, ObjectNotFound, ValueError, RuntimeError, OSError) as exc:
        return session.fail(f"cannot start inference: {exc}", protocol.EXIT_BAD_CONFIG)

    def process(shard: int) -> bytes:
        return predict_shard(model, shard, shards[shard])

    return run_batch_inference(session, len(shards), process)


def load_model(session: Any) -> torch.nn.Module:
    """Return the digits model from $GPUJOBS_MODEL_URI or the job's final/model.pt."""
    uri = os.environ.get(protocol.ENV_MODEL_URI)
    if uri:
        folder, _, name = uri.rstrip("/").rpartition("/")
        storage = open_storage(folder)
        try:
            payload = session.loop.run(storage.get_bytes(name), MODEL_TIMEOUT_S)
        finally:
            session.loop.run(storage.close(), 10)
    else:
        uri = f"{session.storage.uri}/{FINAL_MODEL_KEY}"
        payload = session.loop.run(session.storage.get_bytes(FINAL_MODEL_KEY), MODEL_TIMEOUT_S)
    model = build_model()
    model.load_state_dict(torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu"))
    model.eval()
    logger.info("loaded model %s (%d bytes)", uri, len(payload))
    return model


def load_input_shards(env: Any, device: torch.device) -> list[InputShard]:
    """Return the input shards named by the environment; raises ConfigError on a bad value."""
    dataset_uri = env.get(protocol.ENV_DATASET_URI)
    if dataset_uri:
        from worker.datasets import fetch_dataset, default_cache_dir

        folder = fetch_dataset(dataset_uri, default_cache_dir(env))
        return _dataset_shards(folder, device)
    raw = env.get(ENV_INFER_SHARDS, "") or str(DEFAULT_SHARDS)
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"invalid {ENV_INFER_SHARDS}={raw!r}: expected a positive integer")
    data = load_digits_data(device)
    features = torch.tensor_split(data.x_test, int(raw))
    labels = torch.tensor_split(data.y_test, int(raw))
    return [InputShard(x, y) for x, y in zip(features, labels, strict=True)]


def _dataset_shards(folder: Path, device: torch.device) -> list[InputShard]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    from worker.train_digits import SPLIT_SEED, TEST_FRACTION

    # The scaler train-digits fitted: the same split of the bundled data set.
    digits = load_digits()
    x_train, _x, _y, _y2 = train_test_split(
        digits.data, digits.target, test_size=TEST_FRACTION, random_state=SPLIT_SEED,
        stratify=digits.target,
    )  # fmt: skip
    scaler = StandardScaler().fit(x_train)
    shards = []
    for index in range(len(list(folder.glob("shard-*.json")))):
        path = folder / f"shard-{index}.json"
        if not path.is_file():
            raise ConfigError(f"dataset {folder} has no {path.name}: number shards from 0")
        content = json.loads(path.read_text())
        values = scaler.transform(np.asarray(content["inputs"], dtype=np.float64))
        labels = content.get("labels")
        shards.append(InputShard(
            torch.tensor(values, dtype=torch.float32, device=device),
            None if labels is None else torch.tensor(labels, dtype=torch.long, device=device),
        ))  # fmt: skip
    if not shards:
        raise ConfigError(f"dataset {folder} contains no shard-<N>.json input files")
    return shards


@torch.no_grad()
def predict_shard(model: torch.nn.Module, index: int, shard: InputShard) -> bytes:
    """Return the shard's output object: predicted classes, and accuracy when labels exist."""
    predictions = model(shard.features).argmax(dim=1)
    result: dict[str, Any] = {
        "shard": index,
        "count": int(predictions.numel()),
        "predictions": predictions.tolist(),
    }
    if shard.labels is not None:
        result["accuracy"] = float((predictions == shard.labels).float().mean())
    return json.dumps(result, sort_keys=True).encode()
