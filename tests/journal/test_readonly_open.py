"""Read-only opens: no change to the file, foreign SQLite files rejected, query limits."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from journal import (
    CorruptJournal,
    EventStore,
    InvalidQuery,
    JournalError,
    NewEvent,
    QueryLimits,
    ReadOnlyViolation,
    run_readonly_query,
    verify_file,
)
from journal_testkit import can_mount_read_only


class Counter:
    name = "counter"
    tables = ("counter",)

    def create(self, conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS counter (stream TEXT PRIMARY KEY, n INTEGER)")

    def apply(self, conn: sqlite3.Connection, event) -> None:
        conn.execute("INSERT INTO counter VALUES (?, 1) ON CONFLICT(stream) DO UPDATE "
                     "SET n = n + 1", (event.stream,))


@pytest.fixture
async def journal_path(tmp_path: Path) -> Path:
    path = tmp_path / "journal.db"
    async with await EventStore.open(path, projections=[Counter()]) as store:
        await store.append("job-1", [NewEvent("JobSubmitted", {"gpu": "A100"})],
                           expected_version=0)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_read_only_store_reads_without_writing(journal_path: Path) -> None:
    before = digest(journal_path)
    async with await EventStore.open(journal_path, projections=[Counter()],
                                     read_only=True) as store:
        assert await store.last_seq() == 1
        rows = await store.query("SELECT n FROM counter WHERE stream = 'job-1'")
        assert rows[0][0] == 1
        with pytest.raises(ReadOnlyViolation, match="opened read-only"):
            await store.append("job-2", [NewEvent("X", {})], expected_version=0)
    assert digest(journal_path) == before


async def test_read_only_store_rejects_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    with pytest.raises(CorruptJournal, match="does not exist"):
        await EventStore.open(path, read_only=True)
    assert not path.exists()


async def test_read_only_store_needs_projection_tables(journal_path: Path) -> None:
    class Other(Counter):
        name = "other"
        tables = ("other",)

    with pytest.raises(JournalError, match=r"lacks the tables \['other'\]"):
        await EventStore.open(journal_path, projections=[Other()], read_only=True)


@pytest.mark.parametrize("read_only", [False, True])
async def test_foreign_sqlite_file_left_unchanged(tmp_path: Path, read_only: bool) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE foo (x)")
    conn.commit()
    conn.close()
    before = digest(path)
    with pytest.raises(CorruptJournal) as caught:
        await EventStore.open(path, read_only=read_only)
    assert "not a journal" in str(caught.value)
    assert digest(path) == before
    tables = sqlite3.connect(path).execute("SELECT name FROM sqlite_master").fetchall()
    assert tables == [("foo",)]


def test_message_of_foreign_file_names_tables(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE foo (x)")
    conn.commit()
    conn.close()
    with pytest.raises(CorruptJournal) as caught:
        asyncio.run(EventStore.open(path))
    assert str(caught.value) == (
        f"{path} is a SQLite database but not a journal (it has the tables foo and no events "
        "table); it was left unchanged: use another path for the journal"
    )


async def test_endless_query_times_out(journal_path: Path) -> None:
    sql = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
           "SELECT count(*) FROM c")
    with pytest.raises(InvalidQuery) as caught:
        run_readonly_query(journal_path, sql, limits=QueryLimits(timeout_s=0.2))
    assert "timed out after 0.2 s" in str(caught.value)
    assert "--timeout-s" in str(caught.value)


async def test_row_limit_rejects_long_output(journal_path: Path) -> None:
    sql = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 11) SELECT x FROM c"
    with pytest.raises(InvalidQuery, match="more than 10 rows; add a LIMIT clause"):
        run_readonly_query(journal_path, sql, limits=QueryLimits(max_rows=10))
    _, rows = run_readonly_query(journal_path, sql.replace("11", "10"),
                                 limits=QueryLimits(max_rows=10))
    assert len(rows) == 10


READ_IN_READ_ONLY_FOLDER = """
import asyncio, sys
from journal import EventStore, run_readonly_query, verify_file
path = sys.argv[1]
print(verify_file(path).ok)
print(run_readonly_query(path, "SELECT count(*) FROM events")[1][0][0])
async def main():
    async with await EventStore.open(path, read_only=True) as store:
        print(await store.last_seq())
asyncio.run(main())
"""


@pytest.mark.skipif(not can_mount_read_only(), reason="needs unshare for a read-only mount")
def test_reads_in_read_only_folder(journal_path: Path) -> None:
    folder = journal_path.parent
    script = (f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && "
              f"{sys.executable} -c '{READ_IN_READ_ONLY_FOLDER}' {journal_path}")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "1", "1"]
    assert verify_file(journal_path).ok
