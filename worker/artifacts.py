"""Final artifacts and the completion marker, which is stored last and means "never rerun"."""

from __future__ import annotations

import json
import logging
from typing import Any

from worker.protocol import COMPLETION_MARKER, FINAL_DIR, CompletionMarker
from worker.storage import ObjectNotFound, Storage
from worker.wire import encode_metrics

logger = logging.getLogger(__name__)

FINAL_MODEL_KEY = f"{FINAL_DIR}/model.pt"
FINAL_METRICS_KEY = f"{FINAL_DIR}/metrics.json"


async def read_completion_marker(storage: Storage) -> CompletionMarker | None:
    """Return the job's completion marker, or None if the job has not completed.

    An unreadable marker raises InvalidCompletionMarker: a marker exists, so the job must not
    rerun blindly.
    """
    try:
        data = await storage.get_bytes(COMPLETION_MARKER)
    except ObjectNotFound:
        return None
    return CompletionMarker.from_json(data)


async def write_final_artifacts(
    storage: Storage,
    model_bytes: bytes | None,
    metrics: dict[str, Any],
    marker: CompletionMarker,
    extra_objects: dict[str, bytes] | None = None,
) -> None:
    """Store the final model (unless None), metrics and extra objects (logs), then the marker."""
    if model_bytes is not None:
        await storage.put_bytes(FINAL_MODEL_KEY, model_bytes)
    metrics_json = json.dumps(encode_metrics(metrics), sort_keys=True, allow_nan=False)
    await storage.put_bytes(FINAL_METRICS_KEY, metrics_json.encode())
    for key, data in (extra_objects or {}).items():
        await storage.put_bytes(key, data)
    await storage.put_bytes(COMPLETION_MARKER, marker.to_json().encode())
    logger.info("stored completion marker for job %s at step %d", marker.job_id, marker.step)
