"""The journal's SQLite schema, forward migrations keyed by PRAGMA user_version, and pragmas.

Migration N (1-based) moves a file from user_version N-1 to N. Opening a file runs the missing
migrations in one IMMEDIATE transaction. A file whose user_version is above len(MIGRATIONS) was
written by newer code, so it is rejected.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from journal.errors import CorruptJournal, JournalError, SchemaTooNew

logger = logging.getLogger(__name__)

_CREATE_EVENTS = (
    """CREATE TABLE events (
        seq            INTEGER PRIMARY KEY,
        stream         TEXT    NOT NULL,
        version        INTEGER NOT NULL CHECK (version >= 1),
        type           TEXT    NOT NULL,
        schema_version INTEGER NOT NULL CHECK (schema_version >= 1),
        data           TEXT    NOT NULL,
        recorded_at    REAL    NOT NULL,
        hash           TEXT    NOT NULL,
        UNIQUE (stream, version)
    )""",
    """CREATE TRIGGER events_reject_update BEFORE UPDATE ON events
    BEGIN
        SELECT RAISE(ABORT, 'events are append-only: UPDATE on table events is rejected');
    END""",
    """CREATE TRIGGER events_reject_delete BEFORE DELETE ON events
    BEGIN
        SELECT RAISE(ABORT, 'events are append-only: DELETE on table events is rejected');
    END""",
)

# Audit queries filter by event type and by time; reads of one stream use the UNIQUE index.
_INDEX_TYPE_AND_TIME = (
    "CREATE INDEX events_by_type ON events (type, seq)",
    "CREATE INDEX events_by_recorded_at ON events (recorded_at)",
)

# Each migration is a tuple of statements, run in order inside the migrating transaction.
MIGRATIONS: tuple[tuple[str, ...], ...] = (_CREATE_EVENTS, _INDEX_TYPE_AND_TIME)
LATEST_SCHEMA_VERSION = len(MIGRATIONS)

SYNCHRONOUS_MODES = ("FULL", "NORMAL")
# A commit of appends to many streams writes one page of the stream index per stream, so
# smaller pages make each commit's WAL writes and sync smaller. SQLite applies the size only
# to a file with no content yet; an existing journal keeps its own.
PAGE_SIZE = 1024
# Pages in the WAL before a commit copies them back into the file (SQLite's default: 1,000).
# Rarer checkpoints copy a page that many commits rewrote once instead of again and again.
WAL_CHECKPOINT_PAGES = 10_000


def configure_writer(conn: sqlite3.Connection, synchronous: str) -> None:
    """Switch the file to WAL and set the durability level of this connection's commits."""
    if synchronous not in SYNCHRONOUS_MODES:
        raise ValueError(f"synchronous={synchronous!r} is invalid; use 'FULL' or 'NORMAL'")
    conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode.lower() != "wal":
        logger.warning("journal could not switch to WAL mode; it stays in %s mode", mode)
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
    conn.execute("PRAGMA foreign_keys=ON")


def migrate(conn: sqlite3.Connection, path: str | Path, target: int = LATEST_SCHEMA_VERSION) -> int:
    """Run the migrations that take the file to `target`; return the version it started at.

    `conn` must be in autocommit mode (isolation_level=None). DDL and user_version are
    transactional in SQLite, so a crash mid-migration leaves the old version intact.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        start = conn.execute("PRAGMA user_version").fetchone()[0]
        if start > LATEST_SCHEMA_VERSION:
            raise _schema_too_new(path, start)
        for version in range(start + 1, target + 1):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={version:d}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    if start < target:
        logger.info("journal %s migrated from schema version %d to %d", path, start, target)
    return start


def _schema_too_new(path: str | Path, version: int) -> SchemaTooNew:
    return SchemaTooNew(
        f"journal {path} has schema version {version}, but this code knows versions up "
        f"to {LATEST_SCHEMA_VERSION}; open it with a newer release of the journal package"
    )


def _user_tables(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
        "ORDER BY name"
    )
    return [row[0] for row in rows]


def reject_foreign_file(conn: sqlite3.Connection, path: str | Path) -> None:
    """Raise CorruptJournal when `path` has tables but no events table, before anything writes.

    An empty file, or one with no tables, becomes a journal. Any other SQLite database belongs
    to something else, so it is left unchanged.
    """
    tables = _user_tables(conn)
    if tables and "events" not in tables:
        table_list = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        raise CorruptJournal(
            f"{path} is a SQLite database but not a journal (it has the tables {table_list} and no "
            "events table); it was left unchanged: use another path for the journal"
        )


def check_readable(conn: sqlite3.Connection, path: str | Path, tables: Sequence[str]) -> None:
    """Check, without writing, that `path` is a journal at the latest schema with `tables`."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    existing = set(_user_tables(conn))
    if "events" not in existing:
        raise CorruptJournal(f"{path} has no events table, so it is not a journal file")
    if version > LATEST_SCHEMA_VERSION:
        raise _schema_too_new(path, version)
    missing = [table for table in tables if table not in existing]
    if version < LATEST_SCHEMA_VERSION or missing:
        raise JournalError(
            f"journal {path} is at schema version {version} of {LATEST_SCHEMA_VERSION} and lacks "
            f"the tables {missing or 'of newer migrations'}; a read-only open cannot migrate it, "
            "so open it once for writing first"
        )
