"""The waiting queue: concurrency counts, and each waiting job's position and reason.

The queue is the supervisor's view, not a fact, so it is not journaled: it is written to a
`queue_status` table in the journal file whenever it changes, for `gpujobs status` to read.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from gpujobs.projections import CREATED, DESTROY_REQUESTED, REQUESTED
from gpujobs.states import JobState

if TYPE_CHECKING:
    from gpujobs.supervisor.core import Supervisor

LIVE_FOR_LIMITS = (REQUESTED, CREATED, DESTROY_REQUESTED)
_DDL = """
CREATE TABLE IF NOT EXISTS queue_status (
    job_id TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    reason TEXT,
    updated_at REAL NOT NULL
)
"""


class LiveCounts:
    """Live instances in total and per team, counted once per tick and kept up to date."""

    def __init__(self) -> None:
        self.total = 0
        self.by_team: Counter[str] = Counter()

    @classmethod
    def count(cls, sup: Supervisor) -> LiveCounts:
        jobs = sup.table.jobs
        teams = [jobs[job_id]["team"] for (job_id, _), row in sup.live_rows.items()
                 if row["status"] in LIVE_FOR_LIMITS]
        counts = cls()
        counts.total = len(teams)
        counts.by_team = Counter(teams)
        return counts

    def add(self, team: str) -> None:
        self.total += 1
        self.by_team[team] += 1


def waiting_jobs(sup: Supervisor, ordered: list[str]) -> list[tuple[str, int, str | None]]:
    """(job id, position, reason) for queued jobs, in the order they will be served."""
    rows = []
    jobs = sup.table.jobs
    queued = JobState.QUEUED.value
    for job_id in ordered:
        if jobs[job_id]["state"] != queued:
            continue
        reason = sup.table.runtime_for(job_id).wait_reason
        rows.append((job_id, len(rows) + 1, reason))
    return rows


class QueuePublisher:
    def __init__(self, journal_path: Path) -> None:
        self.journal_path = journal_path
        self._last: list[tuple[str, int, str | None]] | None = None

    async def publish(self, rows: list[tuple[str, int, str | None]]) -> None:
        if rows == self._last:
            return
        await asyncio.to_thread(self._write, rows)
        self._last = rows

    def _write(self, rows: list[tuple[str, int, str | None]]) -> None:
        conn = sqlite3.connect(self.journal_path, timeout=30.0, isolation_level=None)
        try:
            conn.execute(_DDL)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM queue_status")
            now = time.time()
            conn.executemany("INSERT INTO queue_status VALUES (?, ?, ?, ?)",
                             [(job_id, pos, reason, now) for job_id, pos, reason in rows])
            conn.execute("COMMIT")
        finally:
            conn.close()


def read_queue(conn: sqlite3.Connection) -> dict[str, tuple[int, str | None]]:
    conn.execute(_DDL)
    return {row[0]: (int(row[1]), row[2])
            for row in conn.execute("SELECT job_id, position, reason FROM queue_status")}
