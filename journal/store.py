"""EventStore: the asyncio face of the journal.

Writes go through group commit. Every append() puts a request on a list and awaits a future.
One writer task takes all pending requests and runs them as one IMMEDIATE transaction on a
dedicated thread with its own sqlite3 connection. It resolves each future after COMMIT returns. A
per-statement aiosqlite writer would pay a thread hand-off (about 0.1 ms) per statement, which
caps it at a few thousand events per second; one hand-off per batch does not. Reads use an
aiosqlite connection, which in WAL mode never waits for the writer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType


import aiosqlite

from journal.encoding import EVENT_COLUMNS, Upcasters, decode_row
from journal.errors import (
    JournalError,
    ReadOnlyViolation,
    StoreClosed,
    sqlite_errors,
    translate_sqlite_error,
)
from journal.readonly import readonly_uri
from journal.records import NewEvent, Projection, RecordedEvent, VerifyResult, WriterStats
from journal.schema import check_readable, configure_writer, migrate, reject_foreign_file
from journal.verify import verify_connection
from journal.writer import AppendRequest, BatchWriter, Outcome, encode_request

logger = logging.getLogger(__name__)

MAX_BATCH_EVENTS = 10_000  # events per group-commit transaction; bounds one commit's latency

_Pending = tuple[AppendRequest, "asyncio.Future[list[RecordedEvent]]"]


class EventStore:
    """An append-only, hash-chained event store in one SQLite file.

    Use one instance per event loop. A caller that cancels an append() whose batch is already
    running cannot stop it: the events may still commit.
    """

    def __init__(
        self,
        path: Path,
        reader: aiosqlite.Connection,
        executor: concurrent.futures.ThreadPoolExecutor,
        writer_conn: sqlite3.Connection | None,
        batch_writer: BatchWriter | None,
        upcasters: Upcasters,
        busy_timeout_s: float,
    ) -> None:
        self.path = path
        self._reader = reader
        self._executor = executor
        self._writer_conn = writer_conn
        self._batch_writer = batch_writer
        self._upcasters = upcasters
        self._busy_timeout_s = busy_timeout_s
        self._pending: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._closed = False
        self._transactions = self._appends = self._events = 0
        self._writer_task = asyncio.create_task(self._run_writer(), name=f"journal-writer {path}")

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        projections: Sequence[Projection] = (),
        upcasters: Mapping[tuple[str, int], Callable[[dict], dict]] | None = None,
        busy_timeout_s: float = 30.0,
        synchronous: str = "FULL",
        read_only: bool = False,
    ) -> EventStore:
        """Open or create the journal at `path`, migrate it, and create the projections' tables.

        With `synchronous="FULL"` a returned append survives power loss. With "NORMAL" it
        survives a process crash, but power loss can drop the last commits (the file stays valid).
        With `read_only=True` the file must already be a journal at the latest schema with the
        projections' tables; it is never created, migrated or written, and append() raises.
        """
        path = Path(path)
        _check_projections(projections)
        upcasters = dict(upcasters or {})
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="journal-writer")
        if read_only:
            try:
                reader = await _open_reader(path, projections, busy_timeout_s)
            except BaseException:
                executor.shutdown(wait=False)
                raise
            logger.info("journal %s opened read-only", path)
            return cls(path, reader, executor, None, None, upcasters, busy_timeout_s)
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(
                executor, _open_writer, path, projections, busy_timeout_s, synchronous
            )
        except BaseException:
            executor.shutdown(wait=False)
            raise
        batch_writer = BatchWriter(conn, path, projections, upcasters, busy_timeout_s)
        try:
            with sqlite_errors(path, busy_timeout_s):
                reader = await aiosqlite.connect(path, timeout=busy_timeout_s)
                await reader.execute("PRAGMA query_only=ON")
        except BaseException:
            await loop.run_in_executor(executor, conn.close)
            executor.shutdown(wait=False)
            raise
        logger.info("journal %s opened (synchronous=%s)", path, synchronous)
        return cls(path, reader, executor, conn, batch_writer, upcasters, busy_timeout_s)

    async def __aenter__(self) -> EventStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # Writes

    async def append(
        self, stream: str, events: Sequence[NewEvent], *, expected_version: int
    ) -> list[RecordedEvent]:
        """Append events to `stream` if it is at `expected_version`; return them once durable.

        Raises VersionConflict when another append moved the stream first (nothing is written),
        InvalidAppend for malformed arguments, ProjectionFailed when a projection raised.
        """
        self._check_writable()
        request = encode_request(stream, events, expected_version)
        future: asyncio.Future[list[RecordedEvent]] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        self._wakeup.set()
        return await future

    async def rebuild_projections(self) -> None:
        """Delete the projections' rows and re-apply every event, in one transaction."""
        batch_writer = self._check_writable()
        loop = asyncio.get_running_loop()
        count = await loop.run_in_executor(self._executor, batch_writer.rebuild)
        logger.info("journal %s rebuilt projections from %d events", self.path, count)

    @property
    def stats(self) -> WriterStats:
        """Counters of committed transactions, appends and events since open()."""
        return WriterStats(self._transactions, self._appends, self._events)

    async def _run_writer(self) -> None:
        """Commit pending appends, one batch at a time, until close() and the queue is empty.

        When a batch commits and more appends are pending, the next batch is handed to the
        writer thread before the finished batch's futures are resolved, so the thread writes
        while the woken tasks run.
        """
        loop = asyncio.get_running_loop()
        running: tuple[list[_Pending], asyncio.Future[list[Outcome]]] | None = None
        while True:
            if running is None:
                if not self._pending:
                    if self._closed:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                running = self._start_batch(loop)
            batch, outcomes_future = running
            try:
                outcomes: list[Outcome] | Exception = await outcomes_future
            except Exception as exc:
                outcomes = exc
            running = self._start_batch(loop) if self._pending else None
            self._finish_batch(batch, outcomes)
            # Release the finished batch before waiting. Kept until the next batch, its events
            # would survive the young GC generations, so only a full collection frees them.
            del batch, outcomes_future, outcomes

    def _start_batch(
        self, loop: asyncio.AbstractEventLoop
    ) -> tuple[list[_Pending], asyncio.Future[list[Outcome]]]:
        batch = self._take_batch()
        requests = [request for request, _ in batch]
        assert self._batch_writer is not None  # append() rejects a read-only store
        outcomes = loop.run_in_executor(self._executor, self._batch_writer.write_batch, requests)
        return batch, outcomes

    def _take_batch(self) -> list[_Pending]:
        """Take the oldest pending appends, up to MAX_BATCH_EVENTS events."""
        batch_length = 0
        event_count = 0
        for request, _ in self._pending:
            if event_count and event_count + len(request.events) > MAX_BATCH_EVENTS:
                break
            event_count += len(request.events)
            batch_length += 1
        batch, self._pending = self._pending[:batch_length], self._pending[batch_length:]
        return batch

    def _finish_batch(self, batch: list[_Pending], outcomes: list[Outcome] | Exception) -> None:
        if isinstance(outcomes, Exception):
            if not isinstance(outcomes, JournalError):
                logger.error(
                    "journal %s writer failed on a batch of %d appends",
                    self.path, len(batch), exc_info=outcomes,
                )
            for _, future in batch:
                if not future.done():
                    future.set_exception(outcomes)
            return

        self._transactions += 1
        for (_, future), outcome in zip(batch, outcomes):
            if isinstance(outcome, list):
                self._appends += 1
                self._events += len(outcome)
            if future.done():
                continue
            if isinstance(outcome, JournalError):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    # Reads

    async def stream_version(self, stream: str) -> int:
        """Return the stream's current version, 0 when it has no events."""
        rows = await self._fetch("SELECT MAX(version) FROM events WHERE stream = ?", (stream,))
        return rows[0][0] or 0

    async def last_seq(self) -> int:
        """Return the seq of the newest event, 0 when the journal is empty."""
        rows = await self._fetch("SELECT MAX(seq) FROM events")
        return rows[0][0] or 0

    async def read_stream(self, stream: str, *, from_version: int = 1) -> list[RecordedEvent]:
        """Return the stream's events from `from_version` on, oldest first, upcast."""
        sql = (
            f"SELECT {EVENT_COLUMNS} FROM events WHERE stream = ? AND version >= ? "
            "ORDER BY version"
        )
        rows = await self._fetch(sql, (stream, from_version))
        return [decode_row(row, self._upcasters) for row in rows]

    async def read_all(
        self, *, from_seq: int = 1, limit: int | None = None
    ) -> list[RecordedEvent]:
        """Return events in seq order from `from_seq` on, at most `limit` of them."""
        sql = f"SELECT {EVENT_COLUMNS} FROM events WHERE seq >= ? ORDER BY seq LIMIT ?"
        rows = await self._fetch(sql, (from_seq, -1 if limit is None else limit))
        return [decode_row(row, self._upcasters) for row in rows]

    async def iter_all(
        self, *, from_seq: int = 1, batch_size: int = 10_000
    ) -> AsyncIterator[RecordedEvent]:
        """Yield events in seq order, fetching `batch_size` rows per query.

        Each batch is its own read, so events committed while iterating are yielded too.
        """
        sql = f"SELECT {EVENT_COLUMNS} FROM events WHERE seq >= ? ORDER BY seq LIMIT ?"
        upcasters = self._upcasters
        while rows := await self._fetch(sql, (from_seq, batch_size)):
            for row in rows:
                yield decode_row(row, upcasters)
            from_seq = rows[-1][0] + 1

    async def query(self, sql: str, params: Sequence = ()) -> list[sqlite3.Row]:
        """Run a read-only statement on the reader connection, for projections' read models."""
        self._check_open()
        with sqlite_errors(self.path, self._busy_timeout_s):
            async with self._reader.execute(sql, tuple(params)) as cursor:
                cursor.row_factory = sqlite3.Row
                return list(await cursor.fetchall())

    async def verify(self) -> VerifyResult:
        """Recompute the hash chain on a separate connection without blocking the event loop."""
        self._check_open()
        return await asyncio.to_thread(_verify_path, self.path, self._busy_timeout_s)

    async def _fetch(self, sql: str, params: Sequence = ()) -> list[tuple]:
        self._check_open()
        with sqlite_errors(self.path, self._busy_timeout_s):
            return list(await self._reader.execute_fetchall(sql, params))

    # Lifecycle

    async def close(self) -> None:
        """Commit the appends already queued, then close both connections."""
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        await self._writer_task
        if self._writer_conn is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._writer_conn.close)
        self._executor.shutdown(wait=True)
        await self._reader.close()
        logger.info("journal %s closed", self.path)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"journal {self.path} is closed; open a new EventStore")

    def _check_writable(self) -> BatchWriter:
        self._check_open()
        if self._batch_writer is None:
            raise ReadOnlyViolation(
                f"journal {self.path} was opened read-only; open it without read_only to write"
            )
        return self._batch_writer


def _check_projections(projections: Sequence[Projection]) -> None:
    names = set()
    for projection in projections:
        if projection.name in names:
            raise JournalError(f"two projections are named {projection.name!r}; rename one")
        names.add(projection.name)
        for table in projection.tables:
            if not table.isidentifier() or table.lower() == "events":
                raise JournalError(
                    f"projection {projection.name!r} declares table {table!r}: use an identifier "
                    "other than 'events'"
                )


def _open_writer(
    path: Path, projections: Sequence[Projection], busy_timeout_s: float, synchronous: str
) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None)
    except sqlite3.Error as exc:
        raise translate_sqlite_error(exc, path, busy_timeout_s) from exc
    try:
        with sqlite_errors(path, busy_timeout_s):
            reject_foreign_file(conn, path)
            configure_writer(conn, synchronous)
            migrate(conn, path)
            _create_projections(conn, projections)
    except BaseException:
        conn.close()
        raise
    return conn


async def _open_reader(
    path: Path, projections: Sequence[Projection], busy_timeout_s: float
) -> aiosqlite.Connection:
    """Open a connection that cannot write, after checking that `path` is a current journal."""
    tables = [table for projection in projections for table in projection.tables]
    uri = await asyncio.to_thread(_check_readable_file, path, tables, busy_timeout_s)
    with sqlite_errors(path, busy_timeout_s):
        reader = await aiosqlite.connect(uri, uri=True, timeout=busy_timeout_s)
        try:
            await reader.execute("PRAGMA query_only=ON")
        except BaseException:
            await reader.close()
            raise
    return reader


def _check_readable_file(path: Path, tables: Sequence[str], busy_timeout_s: float) -> str:
    uri = readonly_uri(path, busy_timeout_s)
    with sqlite_errors(path, busy_timeout_s):
        conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout_s)
        try:
            check_readable(conn, path, tables)
        finally:
            conn.close()
    return uri


def _create_projections(conn: sqlite3.Connection, projections: Sequence[Projection]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        for projection in projections:
            projection.create(conn)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _verify_path(path: Path, busy_timeout_s: float) -> VerifyResult:
    with sqlite_errors(path, busy_timeout_s):
        conn = sqlite3.connect(path, timeout=busy_timeout_s)
        try:
            return verify_connection(conn)
        finally:
            conn.close()
