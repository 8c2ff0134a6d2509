"""Read-only connections to a journal file, and ad-hoc read-only SQL over it, for audits.

Three layers keep the file unchanged by ad-hoc SQL: the file is opened with the URI `mode=ro`, the connection
sets `PRAGMA query_only`, and an authorizer denies every action that writes. The authorizer is
what lets the error name the statement kind; the other two also stop what it might miss.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from journal.errors import (
    CorruptJournal,
    InvalidQuery,
    JournalError,
    JournalLocked,
    ReadOnlyViolation,
    StorageError,
    sqlite_errors,
    translate_sqlite_error,
)

# SQLite virtual-machine instructions between two checks of a query's deadline.
_PROGRESS_STEPS = 10_000


@dataclass(frozen=True)
class QueryLimits:
    """Bounds of one ad-hoc query: run time in seconds and rows returned (None: no bound)."""

    timeout_s: float | None = None
    max_rows: int | None = None

_DENIED_ACTIONS: dict[int, str] = {
    sqlite3.SQLITE_INSERT: "INSERT",
    sqlite3.SQLITE_UPDATE: "UPDATE",
    sqlite3.SQLITE_DELETE: "DELETE",
    sqlite3.SQLITE_ALTER_TABLE: "ALTER TABLE",
    sqlite3.SQLITE_ATTACH: "ATTACH",  # VACUUM INTO also needs ATTACH
    sqlite3.SQLITE_DETACH: "DETACH",
    sqlite3.SQLITE_REINDEX: "REINDEX",
    sqlite3.SQLITE_ANALYZE: "ANALYZE",
    sqlite3.SQLITE_CREATE_VTABLE: "CREATE VIRTUAL TABLE",
    sqlite3.SQLITE_DROP_VTABLE: "DROP VIRTUAL TABLE",
}
_DENIED_PREFIXES = {"SQLITE_CREATE_": "CREATE", "SQLITE_DROP_": "DROP"}
for _name in dir(sqlite3):
    for _prefix, _kind in _DENIED_PREFIXES.items():
        if _name.startswith(_prefix):
            _DENIED_ACTIONS.setdefault(getattr(sqlite3, _name), _kind)

# Pragmas whose argument selects what to read, never a value to set.
_READ_PRAGMAS_WITH_ARGUMENT = frozenset({
    "table_info", "table_xinfo", "table_list", "index_info", "index_xinfo", "index_list",
    "foreign_key_list", "foreign_key_check", "integrity_check", "quick_check", "pragma_list",
    "function_list", "module_list", "collation_list", "database_list", "compile_options",
})
_SCHEMA_TABLES = ("sqlite_master", "sqlite_temp_master", "sqlite_schema")
# Pragmas that write even without an argument.
_WRITING_PRAGMAS = frozenset({"optimize", "wal_checkpoint", "incremental_vacuum", "shrink_memory"})


class _Authorizer:
    """sqlite3 authorizer that denies writes and remembers which statement kind it denied."""

    def __init__(self, sql: str = "") -> None:
        self._denied: list[tuple[str, str]] = []
        words = sql.split(None, 1)
        self._plain_select = bool(words) and words[0].upper() in ("SELECT", "VALUES")

    def __call__(self, action: int, arg1: str | None, arg2: str | None, *_: object) -> int:
        # A pragma function (FROM pragma_table_info('jobs')) makes SQLite ask to update the
        # schema table. A statement that starts with SELECT or VALUES cannot write, so it may.
        schema_update = action == sqlite3.SQLITE_UPDATE and (arg1 or "").lower() in _SCHEMA_TABLES
        if schema_update and self._plain_select:
            return sqlite3.SQLITE_OK
        kind = _DENIED_ACTIONS.get(action)
        if kind is None and action == sqlite3.SQLITE_PRAGMA:
            kind = _pragma_kind(arg1 or "", arg2)
        if kind is None:
            return sqlite3.SQLITE_OK
        self._denied.append((kind, arg1 or ""))
        return sqlite3.SQLITE_DENY

    def denied_kind(self, sql: str) -> str | None:
        """Return the statement kind to report, or None when nothing was denied.

        SQLite checks CREATE and DROP by first asking to write to sqlite_master, so a denied
        write to that table is reported with the statement's leading keyword.
        """
        if not self._denied:
            return None
        kind, target = self._denied[0]
        if target.lower() in _SCHEMA_TABLES:
            words = sql.split(None, 1)
            return words[0].upper() if words else kind
        return kind


def _pragma_kind(name: str, argument: str | None) -> str | None:
    name = name.lower()
    if name in _WRITING_PRAGMAS:
        return f"PRAGMA {name}"
    if argument is not None and name not in _READ_PRAGMAS_WITH_ARGUMENT:
        return f"PRAGMA {name}={argument}"
    return None


def readonly_uri(path: str | Path, busy_timeout_s: float = 30.0) -> str:
    """Return the URI that opens the journal at `path` read-only, even in a read-only folder.

    A read-only connection to a WAL file needs the -shm file. When the folder is not writable
    and no writer has the file open, SQLite cannot create it, so the file is opened with
    `immutable=1`: no -wal file exists then, so no commit is waiting outside the main file.
    """
    try:
        exists = Path(path).is_file()
    except OSError as exc:
        raise StorageError(
            f"cannot read journal {path} ({exc.strerror or exc}); check the permissions of its "
            "folder"
        ) from exc
    if not exists:
        raise CorruptJournal(f"journal {path} does not exist; check the path")
    uri = f"{Path(path).resolve().as_uri()}?mode=ro"
    try:
        probe = sqlite3.connect(uri, uri=True, timeout=busy_timeout_s)
        try:
            probe.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            probe.close()
    except sqlite3.OperationalError as exc:
        wal = Path(f"{path}-wal")
        if wal.exists() or os.access(Path(path).parent, os.W_OK):
            raise translate_sqlite_error(exc, path, busy_timeout_s) from exc
        return f"{uri}&immutable=1"
    except sqlite3.Error as exc:
        raise translate_sqlite_error(exc, path, busy_timeout_s) from exc
    return uri


def connect_readonly(path: str | Path, busy_timeout_s: float = 30.0) -> sqlite3.Connection:
    """Open the journal at `path` with a connection that cannot write to it."""
    uri = readonly_uri(path, busy_timeout_s)
    with sqlite_errors(path, busy_timeout_s):
        conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout_s)
        conn.execute("PRAGMA query_only=ON")
    return conn


def run_readonly_query(
    path: str | Path, sql: str, params: Sequence = (), *, limits: QueryLimits | None = None
) -> tuple[list[str], list[tuple]]:
    """Run one read-only statement on the journal at `path`; return column names and rows.

    `limits` bounds the statement's run time and the rows it returns. Reaching either raises
    InvalidQuery, whose message names the limit and the `gpujobs audit sql` option that sets it.
    Waiting for a lock that another connection holds counts toward the time limit.
    """
    limits = limits or QueryLimits()
    try:
        conn = connect_readonly(path, _lock_wait_s(limits))
    except JournalLocked as exc:
        raise _locked(path, limits) from exc
    try:
        return _run(conn, path, sql, params, limits)
    finally:
        conn.close()


def _lock_wait_s(limits: QueryLimits) -> float:
    return 30.0 if limits.timeout_s is None else limits.timeout_s


def _locked(path: str | Path, limits: QueryLimits) -> JournalLocked:
    fix = "stop the other writer, or try again"
    if limits.timeout_s is not None:
        fix = "stop the other writer, or raise --timeout-s"
    return JournalLocked(
        f"journal {path} is locked: another connection held its lock for more than "
        f"{_lock_wait_s(limits):g} s; {fix}"
    )


def _run(
    conn: sqlite3.Connection, path: str | Path, sql: str, params: Sequence, limits: QueryLimits
) -> tuple[list[str], list[tuple]]:
    authorizer = _Authorizer(sql)
    conn.set_authorizer(authorizer)
    deadline = None if limits.timeout_s is None else time.monotonic() + limits.timeout_s
    if deadline is not None:
        conn.set_progress_handler(lambda: time.monotonic() > deadline, _PROGRESS_STEPS)
    try:
        cursor = conn.execute(sql, tuple(params))
        rows = _fetch_rows(cursor, limits.max_rows)
    except sqlite3.OperationalError as exc:
        if deadline is not None and time.monotonic() > deadline and "interrupt" in str(exc):
            raise InvalidQuery(
                f"query on journal {path} timed out after {limits.timeout_s:g} s and was "
                "stopped; narrow it with WHERE or LIMIT, or raise --timeout-s"
            ) from exc
        raise _classify(authorizer, path, sql, exc, limits) from exc
    except sqlite3.Error as exc:
        raise _classify(authorizer, path, sql, exc, limits) from exc
    except sqlite3.Warning as exc:
        raise _query_error(path, sql, exc) from exc
    columns = [column[0] for column in cursor.description or ()]
    return columns, rows


def _fetch_rows(cursor: sqlite3.Cursor, max_rows: int | None) -> list[tuple]:
    if max_rows is None:
        return cursor.fetchall()
    rows = cursor.fetchmany(max_rows + 1)
    if len(rows) > max_rows:
        raise InvalidQuery(
            f"query returned more than {max_rows} rows; add a LIMIT clause or raise --max-rows"
        )
    return rows


def _classify(
    authorizer: _Authorizer, path: str | Path, sql: str, exc: sqlite3.Error, limits: QueryLimits
) -> JournalError:
    # By the result code, because a message contains "locked" when a column is named so.
    if getattr(exc, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return _locked(path, limits)
    lowered = str(exc).lower()
    denied = authorizer.denied_kind(sql)
    if denied is not None:
        return ReadOnlyViolation(
            f"rejected {denied}: audit queries are read-only; "
            "use SELECT or a PRAGMA that only reads"
        )
    if "readonly" in lowered or "read-only" in lowered:
        return ReadOnlyViolation(
            f"rejected statement: it would write to {path} ({exc}); audit queries are read-only"
        )
    return _query_error(path, sql, exc)


def _query_error(path: str | Path, sql: str, exc: Exception) -> InvalidQuery:
    return InvalidQuery(f"query on journal {path} failed: {exc}; fix the SQL {sql!r}")
