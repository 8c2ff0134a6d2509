"""Folder backend: one file per key under a root folder, written atomically."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

from worker.storage.base import ObjectNotFound, StorageError, StorageUnavailable, validate_key

# Temporary files start with this; list() hides them so readers never see partial objects.
TEMP_PREFIX = ".partial-"


class LocalStorage:
    """Storage in a local folder; file:///abs/path. Writes go to a temp file, then os.replace."""

    def __init__(self, root: Path) -> None:
        if not root.is_absolute():
            raise StorageError(f"local storage root {str(root)!r} must be an absolute path")
        self.root = root
        self.uri = f"file://{root}"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    async def put_bytes(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._write_atomic, self._path(key), lambda out: out.write(data))

    async def put_file(self, key: str, path: Path) -> None:
        def copy(out) -> None:
            with open(path, "rb") as source:
                shutil.copyfileobj(source, out, 1024 * 1024)

        await asyncio.to_thread(self._write_atomic, self._path(key), copy)

    async def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(f"{self.uri}/{key}") from exc
        except OSError as exc:
            raise StorageUnavailable(f"cannot read {path}: {exc}") from exc

    async def get_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not await asyncio.to_thread(source.is_file):
            raise ObjectNotFound(f"{self.uri}/{key}")
        try:
            await asyncio.to_thread(shutil.copyfile, source, path)
        except OSError as exc:
            raise StorageError(f"cannot copy {source} to {path}: {exc}") from exc

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._path(key).is_file)

    async def list(self, prefix: str = "") -> list[str]:
        return await asyncio.to_thread(self._list_sync, prefix)

    async def delete(self, key: str) -> None:
        try:
            await asyncio.to_thread(self._path(key).unlink)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot delete {self.uri}/{key}: {exc}") from exc

    async def close(self) -> None:
        return None

    def _write_atomic(self, path: Path, write) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
        except OSError as exc:
            raise StorageUnavailable(f"cannot write under {path.parent}: {exc}") from exc
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp_name, path)
            _fsync_folder(path.parent)
        except BaseException as exc:
            Path(temp_name).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise StorageError(f"cannot write {path}: {exc}") from exc
            raise

    def _list_sync(self, prefix: str) -> list[str]:
        if prefix.strip("/"):
            validate_key(prefix.strip("/"))
        # Walk only the folder the prefix names, then filter by the whole prefix as S3 does.
        folder = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        if not folder.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(folder):
            for name in files:
                if name.startswith(TEMP_PREFIX):
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable; some filesystems do not support fsync on a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
