"""Push a file or folder to the artifact store once, addressed by its content.

The layout, the manifest and the digest are defined in worker.datasets, which workers use to
fetch and verify what this module stores.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from gpujobs.errors import GpujobsError
from worker.datasets import FILES_DIR, MANIFEST_KEY, DatasetError, DatasetManifest, scan_files
from worker.protocol import DATASETS_DIR
from worker.storage import InvalidKey, StorageError, open_storage, validate_key

logger = logging.getLogger(__name__)


class DatasetPushFailed(GpujobsError):
    """A dataset could not be read or stored."""


@dataclass(frozen=True)
class PushedDataset:
    """The outcome of a push; uploaded_files is 0 when the content was already stored."""

    uri: str
    digest: str
    file_count: int
    size_bytes: int
    uploaded_files: int


def _reject_outside_links(root: Path) -> None:
    """Raise DatasetPushFailed for a symbolic link in folder `root` that leads out of it.

    Such a link would upload a file the user never put in the dataset, such as /etc/passwd.
    Links to folders are not followed by the scan, so only links to files are checked.
    """
    if not root.is_dir():
        return
    resolved_root = root.resolve()
    for link in sorted(root.rglob("*")):
        if not link.is_symlink():
            continue
        target = link.resolve()
        if not target.is_relative_to(resolved_root):
            raise DatasetPushFailed(
                f"dataset {root} contains the symbolic link {link} to {target}, outside the "
                "folder; remove the link or copy the file into the folder"
            )


def datasets_uri(artifact_root: str) -> str:
    return f"{artifact_root.rstrip('/')}/{DATASETS_DIR}"


async def push_dataset(artifact_root: str, path: Path) -> PushedDataset:
    """Store path's files, then the manifest, unless a dataset with that digest exists.

    NOTE: files are hashed before they are uploaded; one that changes in between makes the
    stored dataset fail verification when a worker fetches it.
    """
    try:
        await asyncio.to_thread(_reject_outside_links, path.expanduser())
        scanned = await asyncio.to_thread(scan_files, path.expanduser())
    except (DatasetError, OSError) as exc:
        raise DatasetPushFailed(f"cannot read dataset {path}: {exc}") from exc
    manifest = DatasetManifest(tuple(item for _, item in scanned), created_at=time.time())
    for item in manifest.files:
        try:
            validate_key(item.path)
        except InvalidKey as exc:
            raise DatasetPushFailed(f"cannot store {path}: {exc}; rename the file") from exc

    digest = manifest.digest
    storage = open_storage(datasets_uri(artifact_root))
    uploaded = 0
    try:
        if not await storage.exists(f"{digest}/{MANIFEST_KEY}"):
            for local, item in scanned:
                await storage.put_file(f"{digest}/{FILES_DIR}/{item.path}", local)
                uploaded += 1
            await storage.put_bytes(f"{digest}/{MANIFEST_KEY}", manifest.to_json().encode())
    except StorageError as exc:
        raise DatasetPushFailed(f"cannot store dataset {path} in {storage.uri}: {exc}") from exc
    finally:
        await storage.close()
    result = PushedDataset(
        uri=f"{datasets_uri(artifact_root)}/{digest}", digest=digest,
        file_count=len(manifest.files), size_bytes=manifest.size_bytes, uploaded_files=uploaded,
    )  # fmt: skip
    logger.info("dataset %s: %d files, %d uploaded", result.uri, result.file_count, uploaded)
    return result
