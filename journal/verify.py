"""Recompute the hash chain of a journal file and name the first row that breaks it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from journal.encoding import EVENT_COLUMNS, GENESIS_HASH, chain_hash
from journal.errors import CorruptJournal, sqlite_errors
from journal.records import VerifyResult

_BATCH_ROWS = 10_000


def verify_file(path: str | Path) -> VerifyResult:
    """Open `path` read-only and verify it; raises CorruptJournal when it is not a journal."""
    if not Path(path).is_file():
        raise CorruptJournal(f"journal {path} does not exist; check the path")
    with sqlite_errors(path, busy_timeout_s=30.0):
        conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=30.0)
        try:
            if not _has_events_table(conn):
                raise CorruptJournal(f"{path} has no events table, so it is not a journal file")
            return verify_connection(conn)
        finally:
            conn.close()


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
