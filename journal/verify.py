"""Recompute the hash chain of a journal file and name the first row that breaks it."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from journal.encoding import EVENT_COLUMNS, GENESIS_HASH, chain_hash
from journal.errors import CorruptJournal, sqlite_errors
from journal.readonly import connect_readonly
from journal.records import VerifyResult

_BATCH_ROWS = 10_000


def verify_file(path: str | Path, head: tuple[int, str] | None = None) -> VerifyResult:
    """Open `path` read-only and verify it; raises CorruptJournal when it is not a journal.

    The chain alone cannot show that its newest rows were deleted, or that the whole tail was
    rewritten with fresh hashes. `head`, a (seq, hash) pair read earlier with `read_head` and
    kept outside the file, closes that gap: the row with that seq must still have that hash.
    """
    with _open_readonly(path) as conn:
        result = verify_connection(conn)
        if not result.ok or head is None:
            return result
        return _check_head(conn, result, head)


def read_head(path: str | Path) -> tuple[int, str] | None:
    """Return the (seq, hash) of the newest row, or None for a journal with no events."""
    with _open_readonly(path) as conn:
        row = conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
    return None if row is None else (row[0], row[1])


@contextlib.contextmanager
def _open_readonly(path: str | Path) -> Iterator[sqlite3.Connection]:
    conn = connect_readonly(path)
    with sqlite_errors(path, busy_timeout_s=30.0):
        try:
            if not _has_events_table(conn):
                raise CorruptJournal(f"{path} has no events table, so it is not a journal file")
            yield conn
        finally:
            conn.close()


def _check_head(conn: sqlite3.Connection, result: VerifyResult, head: tuple[int, str]) -> VerifyResult:
    seq, expected_hash = head
    row = conn.execute("SELECT hash FROM events WHERE seq = ?", (seq,)).fetchone()
    if row is None:
        reason = (f"seq {seq} of the recorded head is missing: the journal ends at seq "
                  f"{result.event_count}, so newer rows were deleted")
        return VerifyResult(False, result.event_count, seq, reason)
    if row[0] != expected_hash:
        reason = (f"seq {seq} has hash {row[0][:16]}..., but the recorded head has "
                  f"{expected_hash[:16]}...; the chain was rewritten up to or past it")
        return VerifyResult(False, result.event_count, seq, reason)
    return result


def verify_connection(conn: sqlite3.Connection) -> VerifyResult:
    """Check seq continuity, per-stream version continuity and every row's chained hash.

    Reads inside one transaction, so rows committed meanwhile by other writers are not seen.
    """
    conn.execute("BEGIN")
    try:
        return _walk_chain(conn.execute(f"SELECT {EVENT_COLUMNS} FROM events ORDER BY seq"))
    finally:
        conn.execute("ROLLBACK")


def _has_events_table(conn: sqlite3.Connection) -> bool:
    sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'"
    return conn.execute(sql).fetchone() is not None


def _walk_chain(cursor: sqlite3.Cursor) -> VerifyResult:
    expected_seq = 1
    previous_hash = GENESIS_HASH
    stream_versions: dict[str, int] = {}
    while rows := cursor.fetchmany(_BATCH_ROWS):
        for row in rows:
            reason = _check_row(row, expected_seq, previous_hash, stream_versions)
            if reason is not None:
                return VerifyResult(False, expected_seq - 1, expected_seq, reason)
            stream_versions[row[1]] = row[2]
            previous_hash = row[7]
            expected_seq += 1
    return VerifyResult(True, expected_seq - 1, None, None)


def _check_row(
    row: tuple, expected_seq: int, previous_hash: str, stream_versions: dict[str, int]
) -> str | None:
    seq, stream, version, event_type, schema_version, data, recorded_at, row_hash = row
    if seq != expected_seq:
        return f"seq {expected_seq} is missing: the row after seq {expected_seq - 1} has seq {seq}"
    expected_version = stream_versions.get(stream, 0) + 1
    if version != expected_version:
        return (
            f"seq {seq}: stream {stream!r} jumps to version {version!r}, "
            f"expected {expected_version}"
        )
    if not isinstance(data, str):
        return f"seq {seq}: data is stored as {type(data).__name__}, expected JSON text"
    try:
        computed = chain_hash(
            previous_hash, seq, stream, version, event_type, schema_version, data, recorded_at
        )
    except (TypeError, ValueError) as exc:
        return f"seq {seq}: a column has the wrong type ({exc})"
    if computed != row_hash:
        return f"seq {seq}: stored hash does not match the recomputed hash; the row was altered"
    return None
