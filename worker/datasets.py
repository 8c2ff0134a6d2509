"""Content-addressed datasets: a manifest of files with their SHA-256, and a verified local cache.

A dataset is stored under <artifact root>/datasets/<digest>/: files/<relative path> for
each file, then manifest.json last. The digest is the SHA-256 of the manifest's file list
(path, size, SHA-256 of each file), so equal content always gets the same URI and a manifest
cannot be swapped for another under the same digest. Workers fetch a dataset into
<cache dir>/datasets/<digest>/ and check every file's size and SHA-256 on each fetch; a file
that does not match is fetched again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from worker import protocol, wire
from worker.errors import WorkerError
from worker.storage import InvalidKey, Storage, open_storage, validate_key

logger = logging.getLogger(__name__)

MANIFEST_KEY = "manifest.json"
FILES_DIR = "files"
HASH_CHUNK_BYTES = 4 * 1024 * 1024
# Each file takes roughly 150 bytes (an estimate for short paths), so about 400,000 files fit.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class DatasetError(WorkerError):
    """A dataset cannot be read, fetched or verified."""


class DatasetCorrupt(DatasetError):
    """Stored dataset content does not match its manifest."""


@dataclass(frozen=True)
class DatasetFile:
    """One file of a dataset: its '/'-separated path inside the dataset, size and SHA-256."""

    path: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class DatasetManifest:
    """The list of files that defines a dataset; stored as manifest.json, after the files."""

    files: tuple[DatasetFile, ...]
    created_at: float = 0.0
    format_version: int = 1

    @property
    def digest(self) -> str:
        return tree_digest(self.files)

    @property
    def size_bytes(self) -> int:
        return sum(item.size_bytes for item in self.files)

    def to_json(self) -> str:
        data = asdict(self)
        data["digest"] = self.digest
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> DatasetManifest:
        """Parse a manifest; raises DatasetCorrupt when it is invalid."""
        try:
            data = wire.load_object(text, MAX_MANIFEST_BYTES)
            files = tuple(
                DatasetFile(str(item["path"]), int(item["size_bytes"]), str(item["sha256"]))
                for item in data["files"]
            )
            return cls(files, float(data.get("created_at", 0.0)), int(data["format_version"]))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise DatasetCorrupt(f"invalid dataset manifest: {exc!r}") from exc


def tree_digest(files: tuple[DatasetFile, ...] | list[DatasetFile]) -> str:
    """Return the SHA-256 over the sorted (path, size, sha256) lines of files."""
    lines = sorted(f"{item.path}\0{item.size_bytes}\0{item.sha256}\n" for item in files)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def scan_files(root: Path) -> list[tuple[Path, DatasetFile]]:
    """Hash a file, or every file under a folder; paths are relative to the folder.

    A single file keeps its own name. Symbolic links are followed; empty folders are lost.
    """
    if root.is_file():
        return [(root, DatasetFile(root.name, root.stat().st_size, file_sha256(root)))]
    if not root.is_dir():
        raise DatasetError(f"dataset path {root} does not exist: give a file or a folder")
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            relative = path.relative_to(root).as_posix()
            found.append((path, DatasetFile(relative, path.stat().st_size, file_sha256(path))))
    if not found:
        raise DatasetError(f"dataset folder {root} contains no files")
    return found


def split_dataset_uri(uri: str) -> tuple[str, str]:
    """Return (URI of the folder holding the dataset folders, digest) of a dataset URI."""
    parent, _, digest = uri.rstrip("/").rpartition("/")
    if not _DIGEST.match(digest) or not parent.endswith(f"/{protocol.DATASETS_DIR}"):
        raise DatasetError(
            f"invalid dataset URI {uri!r}: expected <artifact root>/{protocol.DATASETS_DIR}/"
            "<sha256>, as printed by `gpujobs data push`"
        )
    return parent, digest


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get(protocol.ENV_CACHE_DIR) or Path.home() / ".cache" / "gpujobs")


def fetch_dataset(uri: str, cache_dir: Path) -> Path:
    """Return the local folder of the dataset at uri, downloading what the cache lacks.

    Every cached file's size and SHA-256 are checked; a mismatch is downloaded again.
    Raises DatasetError (or DatasetCorrupt when the stored copy itself is bad).
    """
    parent, digest = split_dataset_uri(uri)

    async def fetch() -> Path:
        storage = open_storage(parent)
        try:
            return await fetch_dataset_async(storage, digest, cache_dir)
        finally:
            await storage.close()

    return asyncio.run(fetch())


async def fetch_dataset_async(storage: Storage, digest: str, cache_dir: Path) -> Path:
    """fetch_dataset for callers that already run an event loop and hold the datasets storage."""
    return await _fetch(storage, digest, cache_dir / protocol.DATASETS_DIR / digest)


async def _fetch(storage: Storage, digest: str, folder: Path) -> Path:
    from worker.storage import ObjectNotFound

    try:
        manifest_bytes = await storage.get_bytes(f"{digest}/{MANIFEST_KEY}")
    except ObjectNotFound as exc:
        raise DatasetError(
            f"dataset {digest} not found in {storage.uri}: push it with `gpujobs data push`"
        ) from exc
    manifest = DatasetManifest.from_json(manifest_bytes)
    if manifest.digest != digest:
        raise DatasetCorrupt(f"manifest of dataset {digest} in {storage.uri} names other files")

    for item in manifest.files:
        try:
            validate_key(item.path)
        except InvalidKey as exc:
            raise DatasetCorrupt(f"dataset {digest} lists an unsafe path: {exc}") from exc

    fetched = 0
    for item in manifest.files:
        target = folder / item.path
        if await asyncio.to_thread(_matches, target, item):
            continue
        if target.exists():
            logger.warning("cached %s does not match its checksum; fetching it again", target)
        await _download(storage, digest, item, target)
        fetched += 1
    logger.info(
        "dataset %s ready in %s: %d files, %d fetched", digest, folder, len(manifest.files), fetched
    )
    return folder


def _matches(path: Path, item: DatasetFile) -> bool:
    try:
        if path.stat().st_size != item.size_bytes:
            return False
    except FileNotFoundError:
        return False
    return file_sha256(path) == item.sha256


async def _download(storage: Storage, digest: str, item: DatasetFile, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".partial-{os.getpid()}-{target.name}")
    try:
        await storage.get_file(f"{digest}/{FILES_DIR}/{item.path}", temp)
        if not await asyncio.to_thread(_matches, temp, item):
            raise DatasetCorrupt(
                f"stored file {item.path} of dataset {digest} in {storage.uri} does not match "
                "its manifest: push the dataset again"
            )
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
