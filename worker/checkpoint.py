"""Checkpoint manager for training code: snapshot in memory, upload in the background.

save() copies the state at once (tensors into CPU memory), so training may change it right
after save() returns; serialization, hashing and upload run in the background. One upload runs
at a time. A newer snapshot replaces a pending one whose upload has not begun.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import copy
import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from worker.background import BackgroundLoop
from worker.checkpoint_store import load_latest_checkpoint, prune_checkpoints, write_checkpoint
from worker.errors import BadCheckpoint, CheckpointTimeout
from worker.protocol import PAYLOAD_NAME, CheckpointRef
from worker.storage import Storage

logger = logging.getLogger(__name__)

DEFAULT_KEEP = 3


@dataclass(frozen=True)
class Snapshot:
    """A state waiting for upload: serialized bytes, or a private copy to serialize later."""

    step: int
    payload: bytes | None
    taken_at: float
    payload_name: str = PAYLOAD_NAME
    state: Any = None


def copy_state(value: Any) -> Any:
    """Copy a checkpoint state: tensors into new CPU memory, containers rebuilt, rest deep-copied.

    NOTE: tensors that share storage (views) become independent copies.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        copied = {key: copy_state(item) for key, item in value.items()}
        if not isinstance(value, collections.OrderedDict):
            return copied
        ordered = collections.OrderedDict(copied)
        if hasattr(value, "_metadata"):  # module state_dict versions, used by load_state_dict
            ordered._metadata = copy.deepcopy(value._metadata)  # type: ignore[attr-defined]
        return ordered
    if isinstance(value, list):
        return [copy_state(item) for item in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(copy_state(item) for item in value)
    return copy.deepcopy(value)


def serialize_state(state: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


class CheckpointManager:
    """Saves and restores checkpoints under one job's storage prefix.

    on_durable is called (on the background thread) with each CheckpointRef once its
    manifest is stored.
    """

    def __init__(
        self,
        storage: Storage,
        loop: BackgroundLoop,
        *,
        keep: int = DEFAULT_KEEP,
        on_durable: Callable[[CheckpointRef], None] | None = None,
    ) -> None:
        self.storage = storage
        self.keep = max(keep, 1)
        self._loop = loop
        self._on_durable = on_durable
        # Reentrant: a future that is already done runs its callback inside add_done_callback.
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._in_flight: concurrent.futures.Future[CheckpointRef] | None = None
        self._pending: Snapshot | None = None
        self._last_durable: CheckpointRef | None = None
        self._last_error: BaseException | None = None
        self.superseded_steps: list[int] = []
        self.last_upload_s: float | None = None

    @property
    def last_durable(self) -> CheckpointRef | None:
        with self._lock:
            return self._last_durable

    @property
    def last_error(self) -> BaseException | None:
        """The error of the most recent failed upload, cleared by the next success."""
        with self._lock:
            return self._last_error

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Copy state now; serialize it with torch.save and upload it in the background."""
        self._enqueue(Snapshot(step, None, time.monotonic(), PAYLOAD_NAME, copy_state(state)))

    def save_payload(self, step: int, payload: bytes, payload_name: str = PAYLOAD_NAME) -> None:
        """Upload already serialized bytes in the background, as save() does."""
        self._enqueue(Snapshot(step, payload, time.monotonic(), payload_name))

    def _enqueue(self, snapshot: Snapshot) -> None:
        step = snapshot.step
        with self._lock:
            if self._in_flight is None:
                self._start_upload(snapshot)
                return
            if self._pending is not None:
                logger.info(
                    "checkpoint at step %d superseded by step %d before its upload began",
                    self._pending.step,
                    step,
                )
                self.superseded_steps.append(self._pending.step)
            self._pending = snapshot

    def wait_durable(self, timeout_s: float | None = None) -> CheckpointRef | None:
        """Wait until no upload is pending or in flight; return the newest durable checkpoint.

        Raises CheckpointTimeout if uploads are still running after timeout_s.
        """
        with self._idle:
            idle = self._idle.wait_for(
                lambda: self._in_flight is None and self._pending is None, timeout_s
            )
            if not idle:
                raise CheckpointTimeout(
                    f"checkpoint upload to {self.storage.uri} not durable after {timeout_s} s"
                )
            return self._last_durable

    def restore_latest(self, map_location: str | torch.device | None = None) -> tuple[
        CheckpointRef, dict[str, Any]
    ] | None:
        """Load the latest valid checkpoint, or return None when there is none.

        map_location None keeps tensors on the device they were saved from, except on a
        machine without CUDA, where they load into CPU memory. Raises BadCheckpoint when a
        checkpoint verifies but torch cannot load it.
        """
        found = self._loop.run(load_latest_checkpoint(self.storage))
        if found is None:
            return None
        ref, payload = found
        if map_location is None and not torch.cuda.is_available():
            map_location = "cpu"  # a checkpoint written on a GPU machine would fail to load
        try:
            state = torch.load(io.BytesIO(payload), weights_only=True, map_location=map_location)
        except Exception as exc:
            raise BadCheckpoint(
                f"checkpoint at step {ref.step} ({ref.uri}) verifies but cannot be loaded: "
                f"{exc}; delete it or fix the training code that reads it"
            ) from exc
        with self._lock:
            self._last_durable = ref
        return ref, state

    def _start_upload(self, snapshot: Snapshot) -> None:
        """Start uploading snapshot; the caller holds the lock."""
        future = self._loop.submit(self._upload(snapshot))
        self._in_flight = future
        future.add_done_callback(lambda done: self._on_upload_done(snapshot, done))

    async def _upload(self, snapshot: Snapshot) -> CheckpointRef:
        started = time.monotonic()
        payload = snapshot.payload
        if payload is None:
            payload = await asyncio.to_thread(serialize_state, snapshot.state)
        ref = await write_checkpoint(self.storage, snapshot.step, payload, snapshot.payload_name)
        self.last_upload_s = time.monotonic() - started
        logger.info(
            "checkpoint at step %d durable at %s (%d bytes, %.2f s)",
            ref.step,
            ref.uri,
            ref.size_bytes,
            self.last_upload_s,
        )
        if self._on_durable is not None:
            # Here rather than in the done callback, so the report does not wait for pruning.
            try:
                self._on_durable(ref)
            except Exception:
                logger.exception("checkpoint callback failed for step %d", ref.step)
        try:
            await prune_checkpoints(self.storage, ref.step, self.keep)
        except Exception as exc:  # a failed cleanup must not undo a durable checkpoint
            logger.warning("could not delete old checkpoints below step %d: %s", ref.step, exc)
        return ref

    def _on_upload_done(
        self, snapshot: Snapshot, future: concurrent.futures.Future[CheckpointRef]
    ) -> None:
        cancelled = future.cancelled()
        error = None if cancelled else future.exception()
        with self._lock:
            if cancelled:
                self._last_error = CheckpointTimeout(f"upload of step {snapshot.step} cancelled")
                self._pending = None  # the loop is shutting down
            elif error is not None:
                self._last_error = error
                logger.error("checkpoint upload at step %d failed: %s", snapshot.step, error)
            else:
                self._last_durable = future.result()
                self._last_error = None
            self._in_flight = None
            if self._pending is not None:
                pending, self._pending = self._pending, None
                self._start_upload(pending)
            else:
                self._idle.notify_all()
