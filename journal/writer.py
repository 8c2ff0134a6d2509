"""The synchronous side of group commit: one IMMEDIATE transaction per batch of appends.

A batch runs on the store's dedicated writer thread with its own sqlite3 connection. The whole
batch is one call into this module, so the thread hand-off (about 0.1 ms per await with
aiosqlite) is paid once per transaction, not once per statement. The fast path inserts every
accepted append of the batch with one executemany. If a projection or an insert raises, the
batch is rolled back to a savepoint and written again with one savepoint per append, so only the
failing append fails.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from journal.encoding import (
    EVENT_COLUMNS,
    GENESIS_HASH,
    Upcasters,
    canonical_json,
    chain_hash,
    decode_row,
    upcast,
)
from journal.errors import (
    InvalidAppend,
    JournalError,
    ProjectionFailed,
    VersionConflict,
    translate_sqlite_error,
)
from journal.records import NewEvent, Projection, RecordedEvent

logger = logging.getLogger(__name__)

_INSERT = (
    "INSERT INTO events (seq, stream, version, type, schema_version, data, recorded_at, hash) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_MAX_SQL_VARIABLES = 500


@dataclass(frozen=True, slots=True)
class EncodedEvent:
    type: str
    schema_version: int
    data_json: str  # canonical JSON, the stored text
    data: dict[str, Any]  # json.loads(data_json): projections get the value a rebuild gives them


@dataclass(frozen=True, slots=True)
class AppendRequest:
    stream: str
    expected_version: int
    events: tuple[EncodedEvent, ...]


Outcome = list[RecordedEvent] | JournalError


def encode_request(stream: str, events: Sequence[NewEvent], expected_version: int) -> AppendRequest:
    """Validate one append and encode its data; raises InvalidAppend naming the bad value."""
    if not isinstance(stream, str) or not stream:
        raise InvalidAppend(f"stream {stream!r} is invalid: use a non-empty string")
    if type(expected_version) is not int or expected_version < 0:
        raise InvalidAppend(
            f"expected_version {expected_version!r} is invalid for stream {stream!r}: use the "
            "stream's current version, 0 for a new stream"
        )
    if not events:
        raise InvalidAppend(f"append to stream {stream!r} has no events: pass at least one")
    return AppendRequest(stream, expected_version, tuple(_encode_event(stream, e) for e in events))


def _encode_event(stream: str, event: NewEvent) -> EncodedEvent:
    if not isinstance(event, NewEvent):
        raise InvalidAppend(f"append to stream {stream!r} got {event!r}; pass NewEvent objects")
    if not isinstance(event.type, str) or not event.type:
        raise InvalidAppend(f"event type {event.type!r} on stream {stream!r} is invalid")
    if type(event.schema_version) is not int or event.schema_version < 1:
        raise InvalidAppend(
            f"schema_version {event.schema_version!r} of {event.type} is invalid: use an int >= 1"
        )
    if not isinstance(event.data, dict):
        raise InvalidAppend(f"data of {event.type} on stream {stream!r} must be a dict")
    try:
        data_json = canonical_json(event.data)
    except (TypeError, ValueError) as exc:
        raise InvalidAppend(
            f"data of {event.type} on stream {stream!r} is not JSON-serialisable: {exc}"
        ) from exc
    return EncodedEvent(event.type, event.schema_version, data_json, json.loads(data_json))


class BatchWriter:
    """Writes batches of appends through one sqlite3 connection; used from one thread only."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: str | Path,
        projections: Sequence[Projection],
        upcasters: Upcasters,
        busy_timeout_s: float,
    ) -> None:
        self._conn = conn
        self._path = path
        self._projections = tuple(projections)
        self._upcasters = upcasters
        self._busy_timeout_s = busy_timeout_s

    def write_batch(self, requests: Sequence[AppendRequest]) -> list[Outcome]:
        """Commit the appends that can be committed; return one outcome per request, in order.

        Raises a JournalError when the transaction itself fails (lock timeout, I/O, COMMIT);
        then nothing in the batch was written.
        """
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                outcomes = self._write_all(requests)
                self._conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        except sqlite3.Error as exc:
            raise translate_sqlite_error(exc, self._path, self._busy_timeout_s) from exc
        return outcomes

    def rebuild(self, batch_size: int = 10_000) -> int:
        """Delete every projection table's rows and re-apply all events in one transaction."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                count = self._reapply_all(batch_size)
                self._conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        except sqlite3.Error as exc:
            raise translate_sqlite_error(exc, self._path, self._busy_timeout_s) from exc
        return count

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    def _write_all(self, requests: Sequence[AppendRequest]) -> list[Outcome]:
        recorded_at = time.time()
        seq, last_hash = self._last_row()
        versions = self._current_versions({r.stream for r in requests})

        self._conn.execute("SAVEPOINT batch")
        try:
            outcomes = self._write_fast(requests, seq, last_hash, dict(versions), recorded_at)
        except (sqlite3.Error, ProjectionFailed) as exc:
            logger.info("group commit falls back to one savepoint per append: %s", exc)
            self._conn.execute("ROLLBACK TO batch")
            outcomes = self._write_each(requests, seq, last_hash, versions, recorded_at)
        self._conn.execute("RELEASE batch")
        return outcomes

    def _write_fast(
        self,
        requests: Sequence[AppendRequest],
        seq: int,
        last_hash: str,
        versions: dict[str, int],
        recorded_at: float,
    ) -> list[Outcome]:
        outcomes: list[Outcome] = []
        rows: list[tuple] = []
        for request in requests:
            actual = versions.get(request.stream, 0)
            if actual != request.expected_version:
                outcomes.append(VersionConflict(request.stream, request.expected_version, actual))
                continue
            events, new_rows = self._build_rows(request, seq, last_hash, recorded_at)
            seq, last_hash = events[-1].seq, events[-1].hash
            versions[request.stream] = events[-1].version
            rows.extend(new_rows)
            outcomes.append(events)

        self._conn.executemany(_INSERT, rows)
        for outcome in outcomes:
            if isinstance(outcome, list):
                self._apply_projections(outcome)
        return outcomes

    def _write_each(
        self,
        requests: Sequence[AppendRequest],
        seq: int,
        last_hash: str,
        versions: dict[str, int],
        recorded_at: float,
    ) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for request in requests:
            actual = versions.get(request.stream, 0)
            if actual != request.expected_version:
                outcomes.append(VersionConflict(request.stream, request.expected_version, actual))
                continue
            events, rows = self._build_rows(request, seq, last_hash, recorded_at)
            self._conn.execute("SAVEPOINT append")
            try:
                self._conn.executemany(_INSERT, rows)
                self._apply_projections(events)
            except (sqlite3.Error, ProjectionFailed) as exc:
                self._conn.execute("ROLLBACK TO append")
                self._conn.execute("RELEASE append")
                outcomes.append(self._as_journal_error(exc))
                continue
            self._conn.execute("RELEASE append")
            seq, last_hash = events[-1].seq, events[-1].hash
            versions[request.stream] = events[-1].version
            outcomes.append(events)
        return outcomes

    def _as_journal_error(self, exc: Exception) -> JournalError:
        if isinstance(exc, JournalError):
            return exc
        journal_error = translate_sqlite_error(exc, self._path, self._busy_timeout_s)
        journal_error.__cause__ = exc
        return journal_error

    def _build_rows(
        self, request: AppendRequest, seq: int, last_hash: str, recorded_at: float
    ) -> tuple[list[RecordedEvent], list[tuple]]:
        events: list[RecordedEvent] = []
        rows: list[tuple] = []
        version = request.expected_version
        for event in request.events:
            seq += 1
            version += 1
            last_hash = chain_hash(
                last_hash, seq, request.stream, version, event.type, event.schema_version,
                event.data_json, recorded_at,
            )
            rows.append((
                seq, request.stream, version, event.type, event.schema_version,
                event.data_json, recorded_at, last_hash,
            ))
            schema_version, data = event.schema_version, event.data
            if self._upcasters:
                schema_version, data = upcast(self._upcasters, event.type, schema_version, data)
            events.append(RecordedEvent(
                seq, request.stream, version, event.type, schema_version, data, recorded_at,
                last_hash,
            ))
        return events, rows

    def _apply_projections(self, events: Iterable[RecordedEvent]) -> None:
        for event in events:
            for projection in self._projections:
                try:
                    projection.apply(self._conn, event)
                except Exception as exc:
                    raise ProjectionFailed(projection.name, event.seq, event.type) from exc

    def _last_row(self) -> tuple[int, str]:
        sql = "SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1"
        row = self._conn.execute(sql).fetchone()
        return (0, GENESIS_HASH) if row is None else (row[0], row[1])

    def _current_versions(self, streams: set[str]) -> dict[str, int]:
        # One correlated MAX per stream uses the UNIQUE index's max lookup; a GROUP BY over
        # "stream IN (...)" would scan every version of every stream instead.
        names = list(streams)
        versions: dict[str, int] = {}
        for start in range(0, len(names), _MAX_SQL_VARIABLES):
            chunk = names[start : start + _MAX_SQL_VARIABLES]
            values = ",".join(["(?)"] * len(chunk))
            sql = (
                "SELECT column1, (SELECT MAX(version) FROM events WHERE stream = column1) "
                f"FROM (VALUES {values})"
            )
            for stream, version in self._conn.execute(sql, chunk):
                if version is not None:
                    versions[stream] = version
        return versions

    def _reapply_all(self, batch_size: int) -> int:
        for projection in self._projections:
            for table in projection.tables:
                self._conn.execute(f'DELETE FROM "{table}"')
        count = 0
        cursor = self._conn.execute(f"SELECT {EVENT_COLUMNS} FROM events ORDER BY seq")
        while rows := cursor.fetchmany(batch_size):
            self._apply_projections(decode_row(row, self._upcasters) for row in rows)
            count += len(rows)
        return count
