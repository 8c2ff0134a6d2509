"""One supervisor per journal: a lease row in the journal's SQLite file.

The lease is not an event: it records who may act now, not what happened. The holder renews it
on every tick and checks it before every side effect (`ensure_held`), so a tick that outlives the
lease stops before its next create or destroy. A lease that expired, on any host, or whose holder
process is gone from this host, can be taken.

NOTE: the check runs before a call, not during it, so a call that starts with half the lease left
and then spends more than that in retries can still end after another supervisor took over.
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

from gpujobs.errors import GpujobsError, SupervisorRunning

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


class LeaseLost(GpujobsError):
    """This supervisor's lease was taken over or removed while it ran; it must stop acting."""

    def __init__(self, journal_path: str, holder: str | None) -> None:
        now_held = f"another supervisor ({holder}) holds it now" if holder else "no one holds it"
        super().__init__(
            f"this supervisor lost its lease on {journal_path} ({now_held}); it stopped before "
            "its next create or destroy. Run one supervisor per journal"
        )
        self.holder = holder


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
        self.expires_at = 0.0  # of the lease as this holder last wrote it

    async def acquire(self) -> None:
        """Take the lease or raise SupervisorRunning naming the live holder."""
        await asyncio.to_thread(self._acquire)

    async def renew(self) -> None:
        """Extend the lease; raise LeaseLost if another holder took it over."""
        await asyncio.to_thread(self._renew)

    async def ensure_held(self) -> None:
        """Renew the lease before a side effect once half its TTL or less is left; no I/O before."""
        if self.expires_at - time.time() > self.ttl_s / 2.0:
            return
        await self.renew()

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
            self._write(conn, now)
        finally:
            conn.close()

    def _renew(self) -> None:
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            current = read_holder(conn)
            if current is None or current.holder != self.holder:
                # Taken over, or released by a supervisor that took it over. Taking it back
                # would let two supervisors act on one journal, even if only for a moment.
                conn.execute("ROLLBACK")
                self.expires_at = 0.0
                raise LeaseLost(str(self.journal_path),
                                None if current is None else current.describe())
            self._write(conn, time.time())
        finally:
            conn.close()

    def _write(self, conn: sqlite3.Connection, now: float) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO supervisor_lease VALUES (1, ?, ?, ?, ?, ?)",
            (self.holder, self.host, self.pid, now, now + self.ttl_s),
        )
        conn.execute("COMMIT")
        self.expires_at = now + self.ttl_s

    def _is_live(self, current: LeaseHolder, now: float) -> bool:
        if current.expires_at <= now:
            return False  # not renewed in time, on whatever host
        if current.host == self.host and not _pid_alive(current.pid):
            return False  # the holder died on this host; no need to wait for the expiry
        return True

    def _release(self) -> None:
        self.expires_at = 0.0
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
