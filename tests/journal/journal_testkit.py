"""Shared pieces of the journal tests: an example projection and a fold to compare it with."""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Iterable

from journal import RecordedEvent


class StreamCounter:
    """Example projection: the number of events and the last version of every stream."""

    name = "stream_counter"
    tables = ("stream_counts",)

    def create(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS stream_counts ("
            " stream TEXT PRIMARY KEY, events INTEGER NOT NULL, last_version INTEGER NOT NULL)"
        )

    def apply(self, conn: sqlite3.Connection, event: RecordedEvent) -> None:
        conn.execute(
            "INSERT INTO stream_counts (stream, events, last_version) VALUES (?, 1, ?) "
            "ON CONFLICT (stream) DO UPDATE SET events = events + 1, last_version = ?",
            (event.stream, event.version, event.version),
        )


class BatchStreamCounter(StreamCounter):
    """StreamCounter with apply_many: one executemany per transaction; records each call."""

    name = "batch_stream_counter"
    tables = ("stream_counts",)

    def __init__(self, poison: str | None = None) -> None:
        self.poison = poison
        self.calls: list[list[int]] = []  # the seqs that each apply_many call got

    def apply(self, conn: sqlite3.Connection, event: RecordedEvent) -> None:
        raise AssertionError("the writer must call apply_many when a projection has it")

    def apply_many(self, conn: sqlite3.Connection, events: list[RecordedEvent]) -> None:
        self.calls.append([event.seq for event in events])
        if any(event.type == self.poison for event in events):
            raise RuntimeError(f"projection rejects {self.poison}")
        conn.executemany(
            "INSERT INTO stream_counts (stream, events, last_version) VALUES (?, 1, ?) "
            "ON CONFLICT (stream) DO UPDATE SET events = events + 1, last_version = ?",
            [(event.stream, event.version, event.version) for event in events],
        )


class FailingOn:
    """Projection that raises on events of one type, to test that only that append fails."""

    name = "failing_on"
    tables: tuple[str, ...] = ()

    def __init__(self, event_type: str) -> None:
        self.event_type = event_type

    def create(self, conn: sqlite3.Connection) -> None:
        pass

    def apply(self, conn: sqlite3.Connection, event: RecordedEvent) -> None:
        if event.type == self.event_type:
            raise RuntimeError(f"projection rejects {event.type}")


def fold_counts(events: Iterable[RecordedEvent]) -> dict[str, tuple[int, int]]:
    """Compute what StreamCounter should hold, straight from the events."""
    counts: dict[str, tuple[int, int]] = {}
    for event in events:
        seen, _ = counts.get(event.stream, (0, 0))
        counts[event.stream] = (seen + 1, event.version)
    return counts


def read_counts(path: str) -> dict[str, tuple[int, int]]:
    """Read StreamCounter's table through a plain sqlite3 connection."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT stream, events, last_version FROM stream_counts").fetchall()
    finally:
        conn.close()
    return {stream: (events, last_version) for stream, events, last_version in rows}


def can_mount_read_only() -> bool:
    """Return whether `unshare -rm` works here, so a test can mount a folder read-only."""
    try:
        done = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0
