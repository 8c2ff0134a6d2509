"""The synchronous side of group commit: one IMMEDIATE transaction per batch of appends.

A batch runs on the store's dedicated writer thread with its own sqlite3 connection. The whole
batch is one call into this module, so the thread hand-off (about 0.1 ms per await with
aiosqlite) is paid once per transaction, not once per statement. The fast path inserts every
accepted append of the batch with one executemany. If a projection or an insert raises, the
batch is rolled back to a savepoint and written again with one savepoint per append, so only the
failing append fails.

The writer remembers the last row and the stream versions it committed. `PRAGMA data_version`
changes when another connection commits to the file, and only then are they read again, so a
batch from the only writer costs no version queries for streams it has seen before.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from journal.encoding import (
    EVENT_COLUMNS,
    GENESIS_HASH,
    Upcasters,
    canonical_json,
    decode_row,
    hash_encoded_row,
    json_string,
    json_time,
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
_MAX_CACHED_STREAMS = 100_000  # past this many, the version cache is dropped and refilled
_SCALAR_TYPES = frozenset({str, int, float, bool, type(None)})
_STR_TYPE = frozenset({str})


# The two records below are NamedTuples, not frozen dataclasses, because one of each is built
# per append on the event loop, and a NamedTuple costs about a quarter as much to build.
class EncodedEvent(NamedTuple):
    type: str
    schema_version: int
    data_json: str  # canonical JSON, the stored text
    data: dict[str, Any]  # equal to json.loads(data_json), the value a rebuild gives projections


class AppendRequest(NamedTuple):
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
    decoded = _decoded(event.data, data_json)
    return EncodedEvent(event.type, event.schema_version, data_json, decoded)


def _decoded(data: dict[str, Any], data_json: str) -> dict[str, Any]:
    """Return json.loads(data_json), without parsing when `data` is a flat dict of scalars.

    For str keys and values of exactly str, int, float, bool or None, the JSON round trip gives
    back equal values, because floats are written as repr, which reads back exactly. A copy
    with the keys in sorted order is then the same dict that parsing would build.
    """
    values_are_scalars = _SCALAR_TYPES.issuperset(map(type, data.values()))
    if values_are_scalars and _STR_TYPE.issuperset(map(type, data)):
        return {key: data[key] for key in sorted(data)}
    return json.loads(data_json)


class _Tail(NamedTuple):
    """Start point of the next batch: the last row's seq and hash, and known stream versions."""

    seq: int
    hash: str
    versions: dict[str, int]  # 0 for a stream known to have no events


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
        self._tail: _Tail | None = None  # None: read it from the file at the next batch
        self._data_version: int | None = None

    def write_batch(self, requests: Sequence[AppendRequest]) -> list[Outcome]:
        """Commit the appends that can be committed; return one outcome per request, in order.

        Raises a JournalError when the transaction itself fails (lock timeout, I/O, COMMIT);
        then nothing in the batch was written.
        """
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                outcomes, tail = self._write_all(requests)
                self._conn.execute("COMMIT")
            except BaseException:
                self._tail = None
                self._rollback()
                raise
        except sqlite3.Error as exc:
            raise translate_sqlite_error(exc, self._path, self._busy_timeout_s) from exc
        self._tail = tail
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

    def _write_all(self, requests: Sequence[AppendRequest]) -> tuple[list[Outcome], _Tail]:
        recorded_at = time.time()
        start = self._current_tail({request.stream for request in requests})

        self._conn.execute("SAVEPOINT batch")
        try:
            tail = _Tail(start.seq, start.hash, dict(start.versions))
            outcomes, tail = self._write_fast(requests, tail, recorded_at)
        except (sqlite3.Error, ProjectionFailed) as exc:
            logger.info("group commit falls back to one savepoint per append: %s", exc)
            self._conn.execute("ROLLBACK TO batch")
            tail = _Tail(start.seq, start.hash, dict(start.versions))
            outcomes, tail = self._write_each(requests, tail, recorded_at)
        self._conn.execute("RELEASE batch")
        return outcomes, tail

    def _current_tail(self, streams: set[str]) -> _Tail:
        """Return the tail after the last commit, re-read if another connection wrote since."""
        data_version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        tail = self._tail
        if tail is None or data_version != self._data_version:
            seq, last_hash = self._last_row()
            tail = _Tail(seq, last_hash, {})
            self._data_version = data_version
        elif len(tail.versions) > _MAX_CACHED_STREAMS:
            tail = _Tail(tail.seq, tail.hash, {})
        unknown = [stream for stream in streams if stream not in tail.versions]
        if unknown:
            tail.versions.update(self._read_versions(unknown))
        return tail

    def _write_fast(
        self, requests: Sequence[AppendRequest], tail: _Tail, recorded_at: float
    ) -> tuple[list[Outcome], _Tail]:
        seq, last_hash, versions = tail
        outcomes: list[Outcome] = []
        rows: list[tuple] = []
        for request in requests:
            actual = versions[request.stream]
            if actual != request.expected_version:
                outcomes.append(VersionConflict(request.stream, request.expected_version, actual))
                continue
            events = self._build_rows(request, seq, last_hash, recorded_at, rows)
            seq, last_hash = events[-1].seq, events[-1].hash
            versions[request.stream] = events[-1].version
            outcomes.append(events)

        self._conn.executemany(_INSERT, rows)
        if self._projections:
            self._apply_projections(
                [event for outcome in outcomes if isinstance(outcome, list) for event in outcome]
            )
        return outcomes, _Tail(seq, last_hash, versions)

    def _write_each(
        self, requests: Sequence[AppendRequest], tail: _Tail, recorded_at: float
    ) -> tuple[list[Outcome], _Tail]:
        seq, last_hash, versions = tail
        outcomes: list[Outcome] = []
        for request in requests:
            actual = versions[request.stream]
            if actual != request.expected_version:
                outcomes.append(VersionConflict(request.stream, request.expected_version, actual))
                continue
            rows: list[tuple] = []
            events = self._build_rows(request, seq, last_hash, recorded_at, rows)
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
        return outcomes, _Tail(seq, last_hash, versions)

    def _as_journal_error(self, exc: Exception) -> JournalError:
        if isinstance(exc, JournalError):
            return exc
        journal_error = translate_sqlite_error(exc, self._path, self._busy_timeout_s)
        journal_error.__cause__ = exc
        return journal_error

    def _build_rows(
        self,
        request: AppendRequest,
        seq: int,
        last_hash: str,
        recorded_at: float,
        rows: list[tuple],
    ) -> list[RecordedEvent]:
        """Hash and number one append's events; add their rows to `rows`, return the events."""
        stream = request.stream
        stream_json = json_string(stream)
        time_json = json_time(recorded_at)
        upcasters = self._upcasters
        events: list[RecordedEvent] = []
        version = request.expected_version
        for event_type, schema_version, data_json, data in request.events:
            seq += 1
            version += 1
            last_hash = hash_encoded_row(
                last_hash, seq, stream_json, version, json_string(event_type), schema_version,
                time_json, data_json,
            )
            rows.append(
                (seq, stream, version, event_type, schema_version, data_json, recorded_at,
                 last_hash)
            )
            if upcasters:
                schema_version, data = upcast(upcasters, event_type, schema_version, data)
            events.append(RecordedEvent(
                seq, stream, version, event_type, schema_version, data, recorded_at, last_hash
            ))
        return events

    def _apply_projections(self, events: Sequence[RecordedEvent]) -> None:
        """Run every projection over `events`, in seq order; one projection after the other.

        A projection with `apply_many` gets the whole list in one call, so that it can write
        with one executemany. When it raises, the error names the first event of the list. The
        batch is then written again one append at a time, so the error narrows to one append.
        """
        if not events:
            return
        for projection in self._projections:
            apply_many = getattr(projection, "apply_many", None)
            if apply_many is not None:
                try:
                    apply_many(self._conn, events)
                except Exception as exc:
                    raise ProjectionFailed(projection.name, events[0].seq, events[0].type) from exc
                continue
            for event in events:
                try:
                    projection.apply(self._conn, event)
                except Exception as exc:
                    raise ProjectionFailed(projection.name, event.seq, event.type) from exc

    def _last_row(self) -> tuple[int, str]:
        sql = "SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1"
        row = self._conn.execute(sql).fetchone()
        return (0, GENESIS_HASH) if row is None else (row[0], row[1])

    def _read_versions(self, streams: list[str]) -> dict[str, int]:
        """Return the current version of each stream, 0 for a stream with no events."""
        # One correlated MAX per stream uses the UNIQUE index's max lookup; a GROUP BY over
        # "stream IN (...)" would scan every version of every stream instead.
        versions: dict[str, int] = {}
        for start in range(0, len(streams), _MAX_SQL_VARIABLES):
            chunk = streams[start : start + _MAX_SQL_VARIABLES]
            values = ",".join(["(?)"] * len(chunk))
            sql = (
                "SELECT column1, (SELECT MAX(version) FROM events WHERE stream = column1) "
                f"FROM (VALUES {values})"
            )
            for stream, version in self._conn.execute(sql, chunk):
                versions[stream] = version or 0
        return versions

    def _reapply_all(self, batch_size: int) -> int:
        for projection in self._projections:
            for table in projection.tables:
                self._conn.execute(f'DELETE FROM "{table}"')
        count = 0
        cursor = self._conn.execute(f"SELECT {EVENT_COLUMNS} FROM events ORDER BY seq")
        while rows := cursor.fetchmany(batch_size):
            self._apply_projections([decode_row(row, self._upcasters) for row in rows])
            count += len(rows)
        return count
