"""Checkpoint layout in storage: write, verify, find the latest, prune. No torch here, so the
orchestrator can read checkpoints before a recovery.

checkpoints/step-<12 digits>/payload.pt is written first, manifest.json last: a checkpoint
without a manifest whose size and SHA-256 match its payload does not exist.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from dataclasses import dataclass

from worker.errors import CheckpointError
from worker.protocol import (
    CHECKPOINTS_DIR,
    MANIFEST_NAME,
    PAYLOAD_NAME,
    CheckpointManifest,
    CheckpointRef,
    InvalidManifest,
    checkpoint_prefix,
)
from worker.storage import ObjectNotFound, Storage, object_uri
from worker.wire import MAX_WIRE_INT

logger = logging.getLogger(__name__)

_STEP_FOLDER = re.compile(rf"^{CHECKPOINTS_DIR}/step-([0-9]+)/")


class InvalidCheckpointData(Exception):
    """A checkpoint folder whose manifest or payload does not verify; internal to this module."""


@dataclass(frozen=True)
class StoredCheckpoint:
    """One checkpoint folder found by listing: the step parsed from its name, and the folder."""

    step: int
    folder: str


async def write_checkpoint(
    storage: Storage, step: int, payload: bytes, payload_name: str = PAYLOAD_NAME
) -> CheckpointRef:
    """Store payload, then its manifest; the checkpoint exists once this returns."""
    digest = await asyncio.to_thread(lambda: hashlib.sha256(payload).hexdigest())
    folder = checkpoint_prefix(step)
    manifest = CheckpointManifest(
        step=step,
        sha256=digest,
        size_bytes=len(payload),
        created_at=time.time(),
        payload=payload_name,
    )
    await storage.put_bytes(f"{folder}/{payload_name}", payload)
    await storage.put_bytes(f"{folder}/{MANIFEST_NAME}", manifest.to_json().encode())
    return CheckpointRef(
        step=step,
        uri=object_uri(storage, f"{folder}/{payload_name}"),
        sha256=digest,
        size_bytes=len(payload),
    )


async def list_checkpoints(storage: Storage) -> list[StoredCheckpoint]:
    """Return checkpoint folders, highest step first, ordered by the step as a number.

    A folder whose step is above MAX_WIRE_INT is skipped with a warning, because no report
    or manifest can carry that step.
    """
    folders: dict[str, int] = {}
    rejected: set[str] = set()
    for key in await storage.list(f"{CHECKPOINTS_DIR}/"):
        match = _STEP_FOLDER.match(key)
        if not match:
            continue
        folder = match.group(0).rstrip("/")
        digits = match.group(1).lstrip("0") or "0"
        if len(digits) > len(str(MAX_WIRE_INT)) or int(digits) > MAX_WIRE_INT:
            if folder not in rejected:
                rejected.add(folder)
                logger.warning(
                    "skipping checkpoint folder %s: its step is above the maximum %d",
                    folder[:80], MAX_WIRE_INT,
                )  # fmt: skip
            continue
        folders[folder] = int(digits)
    found = [StoredCheckpoint(step, folder) for folder, step in folders.items()]
    return sorted(found, key=lambda item: (item.step, item.folder), reverse=True)


async def find_latest_checkpoint(
    storage: Storage, *, verify_payload: bool = True
) -> CheckpointRef | None:
    """Return the highest-step checkpoint that verifies, or None; invalid ones are skipped.

    With verify_payload=False only the manifest and the payload's presence are checked,
    which avoids downloading the payload.
    """
    found = await load_latest_checkpoint(storage, verify_payload=verify_payload)
    return found[0] if found else None


async def load_latest_checkpoint(
    storage: Storage, *, verify_payload: bool = True
) -> tuple[CheckpointRef, bytes] | None:
    """Return the latest valid checkpoint and its payload (empty when not verified)."""
    for stored in await list_checkpoints(storage):
        try:
            return await _verify(storage, stored, verify_payload)
        except InvalidCheckpointData as exc:
            logger.warning(
                "skipping checkpoint %s/%s at step %d: %s",
                stored.folder, MANIFEST_NAME, stored.step, exc,
            )  # fmt: skip
    return None


async def load_checkpoint_at(storage: Storage, step: int) -> tuple[CheckpointRef, bytes]:
    """Return the checkpoint at step and its verified payload; raises CheckpointError.

    Ranks other than 0 call this with the step rank 0 chose, so all restore the same one.
    """
    stored = StoredCheckpoint(step, checkpoint_prefix(step))
    try:
        return await _verify(storage, stored, verify_payload=True)
    except InvalidCheckpointData as exc:
        raise CheckpointError(f"checkpoint at step {step} in {storage.uri} is invalid: {exc}") from exc


async def _verify(
    storage: Storage, stored: StoredCheckpoint, verify_payload: bool
) -> tuple[CheckpointRef, bytes]:
    try:
        manifest_bytes = await storage.get_bytes(f"{stored.folder}/{MANIFEST_NAME}")
    except ObjectNotFound:
        raise InvalidCheckpointData("no manifest (the upload did not finish)") from None
    try:
        manifest = CheckpointManifest.from_json(manifest_bytes)
    except InvalidManifest as exc:
        raise InvalidCheckpointData(str(exc)) from exc
    if manifest.step != stored.step:
        raise InvalidCheckpointData(f"manifest names step {manifest.step}")

    payload_key = f"{stored.folder}/{manifest.payload}"
    payload = b""
    if verify_payload:
        try:
            payload = await storage.get_bytes(payload_key)
        except ObjectNotFound:
            raise InvalidCheckpointData(f"payload {manifest.payload} is missing") from None
        await asyncio.to_thread(_check_payload, manifest, payload)
    elif not await storage.exists(payload_key):
        raise InvalidCheckpointData(f"payload {manifest.payload} is missing")

    ref = CheckpointRef(
        step=stored.step,
        uri=object_uri(storage, payload_key),
        sha256=manifest.sha256,
        size_bytes=manifest.size_bytes,
    )
    return ref, payload


def _check_payload(manifest: CheckpointManifest, payload: bytes) -> None:
    if len(payload) != manifest.size_bytes:
        raise InvalidCheckpointData(
            f"payload has {len(payload)} bytes, manifest expects {manifest.size_bytes}"
        )
    digest = hashlib.sha256(payload).hexdigest()
    if digest != manifest.sha256:
        raise InvalidCheckpointData(f"payload SHA-256 {digest} does not match the manifest")


async def prune_checkpoints(storage: Storage, durable_step: int, keep: int) -> list[int]:
    """Delete checkpoints below durable_step beyond the newest keep (durable_step's included).

    Call only once durable_step is durable, so the newest valid checkpoint always survives.
    Folders above durable_step (left by an attempt that died mid-upload) are not touched.
    The manifest goes first, so a half-deleted checkpoint is never taken for a valid one.
    """
    older = [item for item in await list_checkpoints(storage) if item.step < durable_step]
    doomed = older[max(keep - 1, 0) :]
    for item in doomed:
        keys = await storage.list(f"{item.folder}/")
        keys.sort(key=lambda key: not key.endswith(MANIFEST_NAME))
        for key in keys:
            await storage.delete(key)
    return [item.step for item in doomed]
