"""The storage interface shared by the folder and S3 backends, its errors and key rules."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from worker.errors import WorkerError


class StorageError(WorkerError):
    """An artifact storage operation failed."""


class ObjectNotFound(StorageError):
    """The key does not exist in the storage."""

    def __init__(self, uri: str) -> None:
        super().__init__(f"object not found: {uri}")
        self.uri = uri


class StorageUnavailable(StorageError):
    """The storage cannot be reached or used: endpoint down, bucket missing, access denied."""


class StorageAuthError(StorageUnavailable):
    """The storage rejected the credentials or denied access."""


class InvalidKey(StorageError):
    """A key is empty, absolute, or has an empty, '.' or '..' segment."""


@runtime_checkable
class Storage(Protocol):
    """Async object storage; keys are '/'-separated and relative to the storage's root."""

    uri: str

    async def put_bytes(self, key: str, data: bytes) -> None:
        """Store data atomically: readers see the old object or the whole new one."""

    async def put_file(self, key: str, path: Path) -> None:
        """Store a local file atomically (multipart on S3 for large files)."""

    async def get_bytes(self, key: str) -> bytes:
        """Return the object's content; raises ObjectNotFound."""

    async def get_file(self, key: str, path: Path) -> None:
        """Download the object to path; raises ObjectNotFound."""

    async def exists(self, key: str) -> bool: ...

    async def list(self, prefix: str = "") -> list[str]:
        """Return every key that starts with prefix, sorted."""

    async def delete(self, key: str) -> None:
        """Delete the object; a missing key is not an error."""

    async def close(self) -> None: ...


def validate_key(key: str) -> str:
    """Return key unchanged, or raise InvalidKey if it could escape the root or is ambiguous."""
    if not key or key.startswith("/") or "\\" in key:
        raise InvalidKey(f"invalid storage key {key!r}: use a relative '/'-separated path")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKey(
                f"invalid storage key {key!r}: segments must not be empty, '.' or '..'"
            )
    return key


def object_uri(storage: Storage, key: str) -> str:
    """Return the full URI of key in storage, e.g. s3://bucket/prefix/key."""
    return f"{storage.uri.rstrip('/')}/{key}"
