"""One supervisor per journal: a lease row in the journal's SQLite file.

The lease is not an event: it records who may act now, not what happened. A holder renews it on
every tick; a lease that expired, or whose holder process is gone from this host, can be taken.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from gpujobs.errors import SupervisorRunning

_DDL = """
CREATE TABLE IF NOT EXISTS supervisor_lease (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    holder TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    acquired_at REAL NOT NULL,
    expires_at REAL NOT NULL
)
"""


@dataclass(frozen=True)
class LeaseHolder:
    holder: str
    host: str
    pid: int
    expires_at: float

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


class SupervisorLease:
    def __init__(self, journal_path: Path, ttl_s: float) -> None:
        self.journal_path = journal_path
        self.ttl_s = ttl_s
        self.holder = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()

    async def acquire(self) -> None:
        """Take the lease or raise SupervisorRunning naming the live holder."""
        await asyncio.to_thread(self._acquire)

    async def renew(self) -> None:
        await asyncio.to_thread(self._acquire)

    async def release(self) -> None:
        await asyncio.to_thread(self._release)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.journal_path, timeout=30.0, isolation_level=None)
        conn.execute(_DDL)
        return conn

    def _acquire(self) -> None:
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            current = read_holder(conn)
            now = time.time()
            if current is not None and current.holder != self.holder and self._is_live(current, now):
                conn.execute("ROLLBACK")
                raise SupervisorRunning(
                    current.describe(), str(self.journal_path), current.expires_at - now
                )
            conn.execute(
                "INSERT OR REPLACE INTO supervisor_lease VALUES (1, ?, ?, ?, ?, ?)",
                (self.holder, self.host, self.pid, now, now + self.ttl_s),
            )
            conn.execute("COMMIT")
        finally:
            conn.close()

    def _is_live(self, current: LeaseHolder, now: float) -> bool:
        if current.expires_at <= now:
            return False
        if current.host == self.host and not _pid_alive(current.pid):
            return False  # the holder died on this host; no need to wait for the expiry
        return True

    def _release(self) -> None:
        conn = self._connect()
        try:
            conn.execute("DELETE FROM supervisor_lease WHERE holder = ?", (self.holder,))
        finally:
            conn.close()


def read_holder(conn: sqlite3.Connection) -> LeaseHolder | None:
    row = conn.execute("SELECT holder, host, pid, expires_at FROM supervisor_lease").fetchone()
    return None if row is None else LeaseHolder(row[0], row[1], int(row[2]), float(row[3]))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
