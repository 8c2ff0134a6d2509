"""Records that cross the journal's public API, and the Projection protocol."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append: a past-tense fact with JSON-serialisable data."""

    type: str
    data: dict[str, Any]
    schema_version: int = 1


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event as stored, after upcasting through every upcaster the store was opened with."""

    seq: int  # global sequence number, 1-based, gap-free in commit order
    stream: str
    version: int  # 1-based position within the stream
    type: str
    schema_version: int
    data: dict[str, Any]
    recorded_at: float  # unix epoch seconds
    hash: str  # hex SHA-256 chained to the previous row's hash


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of recomputing the hash chain: `first_bad_seq` is None when the chain is intact."""

    ok: bool
    event_count: int  # rows that verified; when ok is False, the rows before first_bad_seq
    first_bad_seq: int | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class WriterStats:
    """Counters of one store's writer since it was opened."""

    transactions: int  # committed write transactions (one per group-commit batch)
    appends: int  # append() calls that committed
    events: int  # events that committed


@runtime_checkable
class Projection(Protocol):
    """A read model kept in the journal's SQLite file and updated in the append transaction.

    `apply` runs on the writer's connection inside its open transaction, so it must not commit,
    roll back or begin a transaction. If it raises, only the append that caused it is rolled back.

    A projection may also define `apply_many(conn, events)`, which gets all events of a
    transaction at once, in seq order, and must leave its tables as `apply` on each would. The
    writer then calls it instead of `apply`, so that it can write with one executemany. Each
    projection gets the transaction's events after the previous projection got all of them, so
    a projection reads only its own tables.
    """

    name: str
    tables: tuple[str, ...]  # tables it owns; rebuild_projections() deletes their rows

    def create(self, conn: sqlite3.Connection) -> None:
        """Create its tables, indexes and views with IF NOT EXISTS."""

    def apply(self, conn: sqlite3.Connection, event: RecordedEvent) -> None:
        """Update its tables for one event."""
