"""Wrapper mode: plain checkpoint files that unmodified training code writes into its folder.

Any regular file of the checkpoint folder outside the step-<N>/ folders (and not hidden) is
uploaded to <job>/wrapper-files/<path> once it is stable: the same size and modification time
in two scans in a row, or the child has exited. Each object is replaced whole, so a stored file is
either its previous or its new version. A new attempt downloads them all before the child starts.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import stat
from pathlib import Path

from worker.background import BackgroundLoop
from worker.storage import InvalidKey, Storage, StorageError

logger = logging.getLogger(__name__)

WRAPPER_FILES_DIR = "wrapper-files"
_STEP_FOLDER = re.compile(r"^step-[0-9]+$")

# A file's (size, modification time in ns) as one scan saw it.
Signature = tuple[int, int]


def plain_files(folder: Path) -> dict[str, Signature]:
    """Return regular files under folder by relative path, without step folders and dot files.

    The walk tolerates files and folders that the child removes meanwhile, and it does not
    follow symlinks.
    """
    found: dict[str, Signature] = {}
    top = str(folder)
    for root, folders, names in os.walk(folder):
        folders[:] = [
            name for name in folders
            if not name.startswith(".") and not (root == top and _STEP_FOLDER.match(name))
        ]  # fmt: skip
        base = Path(root)
        for name in names:
            if name.startswith("."):
                continue
            path = base / name
            try:
                info = path.lstat()
            except FileNotFoundError:  # deleted between the listing and the stat
                continue
            if stat.S_ISREG(info.st_mode):
                found[path.relative_to(folder).as_posix()] = (info.st_size, info.st_mtime_ns)
    return found


class PlainFileSync:
    """Uploads the folder's plain files once stable; restore() brings them back on start.

    NOTE: a file rewritten in place while its upload runs may be stored torn; the next scan
    sees the new modification time and uploads it again, and the last sync runs after the
    child has exited.
    """

    def __init__(self, storage: Storage, loop: BackgroundLoop, folder: Path) -> None:
        self.storage = storage
        self.folder = folder
        self._loop = loop
        self._previous_scan: dict[str, Signature] = {}
        self._uploaded: dict[str, Signature] = {}
        self._uploads: list[concurrent.futures.Future[None]] = []
        self._unstorable: set[str] = set()  # names that no storage key can carry

    def restore(self, timeout_s: float) -> list[str]:
        """Download every stored plain file into the folder; return their relative paths."""
        restored = self._loop.run(self._download_all(), timeout_s)
        self._uploaded = plain_files(self.folder)
        self._previous_scan = dict(self._uploaded)
        return restored

    async def _download_all(self) -> list[str]:
        prefix = f"{WRAPPER_FILES_DIR}/"
        restored = []
        for key in await self.storage.list(prefix):
            relative = key.removeprefix(prefix)
            target = (self.folder / relative).resolve()
            if not target.is_relative_to(self.folder.resolve()):
                logger.warning("skipped stored file %s: its path leaves %s", key, self.folder)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            await self.storage.get_file(key, target)
            restored.append(relative)
        return restored

    def scan(self, final: bool = False) -> list[str]:
        """Start uploads of changed files that are stable, or of every changed file if final.

        Returns the relative paths whose upload started.
        """
        current = plain_files(self.folder)
        started = []
        for relative, signature in sorted(current.items()):
            if relative in self._unstorable:
                continue
            stable = final or self._previous_scan.get(relative) == signature
            if stable and self._uploaded.get(relative) != signature:
                self._uploaded[relative] = signature
                self._uploads.append(self._loop.submit(self._upload(relative)))
                started.append(relative)
        self._previous_scan = current
        return started

    async def _upload(self, relative: str) -> None:
        try:
            await self.storage.put_file(f"{WRAPPER_FILES_DIR}/{relative}", self.folder / relative)
        except InvalidKey as exc:  # retrying cannot help
            self._unstorable.add(relative)
            logger.warning("checkpoint file %s is never uploaded: %s; rename it", relative, exc)
            return
        except (StorageError, OSError) as exc:
            self._uploaded.pop(relative, None)  # so that the next scan tries again
            logger.warning("could not upload checkpoint file %s: %s", relative, exc)
            return
        except BaseException:
            self._uploaded.pop(relative, None)  # not stored, whatever stopped the upload
            raise
        logger.info("checkpoint file %s uploaded", relative)

    def all_stored(self) -> bool:
        """Return True when every plain file in the folder is stored as it is now on disk."""
        if not self.wait(0):
            return False
        return all(
            self._uploaded.get(rel) == sig
            for rel, sig in plain_files(self.folder).items()
            if rel not in self._unstorable
        )

    def wait(self, timeout_s: float) -> bool:
        """Wait for the uploads started so far; return False if some were still running."""
        _, running = concurrent.futures.wait(self._uploads, timeout_s)
        self._uploads = list(running)
        return not running
