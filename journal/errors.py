"""Errors raised by the journal, and the one place where sqlite3 errors are translated.

JournalError
├── VersionConflict      an append expected a stream version that another writer moved on
├── InvalidAppend        an append was malformed (no events, bad type, data not JSON)
├── ProjectionFailed     a projection raised on an event, so its append was rolled back
├── CorruptJournal       a stored row cannot be decoded, or the file is not a journal
├── JournalLocked        the write lock stayed busy for longer than the busy timeout
├── SchemaTooNew         the file was written by a newer version of this package
├── ReadOnlyViolation    a read-only query tried to change something
├── InvalidQuery         a read-only query failed for another reason (syntax, unknown table)
├── StoreClosed          the store was used after close()
└── StorageError         any other SQLite failure (disk full, I/O error, permissions)
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path


class JournalError(Exception):
    """Root of every error raised by the journal package."""


class VersionConflict(JournalError):
    """Raised when a stream's version is not the one an append expected; nothing was written."""

    def __init__(self, stream: str, expected: int, actual: int) -> None:
        self.stream = stream
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"version conflict on stream {stream!r}: expected version {expected}, "
            f"but the stream is at version {actual}; re-read the stream and retry"
        )


class InvalidAppend(JournalError, ValueError):
    """Raised before anything is queued when an append's arguments are malformed."""


class ProjectionFailed(JournalError):
    """Raised when a projection's apply() fails; the append that caused it was rolled back."""

    def __init__(self, projection: str, seq: int, event_type: str) -> None:
        self.projection = projection
        self.seq = seq
        self.event_type = event_type
        super().__init__(
            f"projection {projection!r} failed on event seq {seq} ({event_type}); "
            "the append was rolled back: fix the projection and append again"
        )


class CorruptJournal(JournalError):
    """Raised when a stored row or the file itself cannot be read as a journal."""

    def __init__(self, message: str, seq: int | None = None) -> None:
        self.seq = seq
        super().__init__(message)


class JournalLocked(JournalError):
    """Raised when another connection held the write lock for longer than the busy timeout."""


class SchemaTooNew(JournalError):
    """Raised when a file's schema version is newer than this code's migrations."""


class ReadOnlyViolation(JournalError):
    """Raised when a read-only query contains a statement that would change the database."""


class InvalidQuery(JournalError):
    """Raised when a read-only query fails for a reason other than trying to write."""


class StoreClosed(JournalError):
    """Raised when a closed EventStore is used."""


class StorageError(JournalError):
    """Raised for SQLite failures that have no more specific class (I/O, disk full, access)."""


def translate_sqlite_error(
    exc: sqlite3.Error, path: str | Path, busy_timeout_s: float
) -> JournalError:
    """Map a sqlite3 error raised while using the journal at `path` to a JournalError."""
    text = str(exc)
    lowered = text.lower()
    if "locked" in lowered or "busy" in lowered:
        return JournalLocked(
            f"journal {path} is locked: another connection held the write lock for more than "
            f"{busy_timeout_s:g} s; stop the other writer or open the store with a larger "
            "busy_timeout_s"
        )
    if "not a database" in lowered or "malformed" in lowered:
        return CorruptJournal(
            f"journal {path} is not a readable SQLite database ({text}); "
            "restore it from a backup or point to the right file"
        )
    if "append-only" in lowered:
        return JournalError(f"journal {path}: {text}")
    return StorageError(f"SQLite failed on journal {path}: {text}")


@contextlib.contextmanager
def sqlite_errors(path: str | Path, busy_timeout_s: float) -> Iterator[None]:
    """Re-raise any sqlite3 error inside the block as the matching JournalError."""
    try:
        yield
    except sqlite3.Error as exc:
        raise translate_sqlite_error(exc, path, busy_timeout_s) from exc
