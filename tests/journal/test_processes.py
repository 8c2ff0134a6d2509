"""Real processes: SIGKILL during appends, two writers on one file, and a held write lock."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from journal import EventStore, JournalLocked, NewEvent, verify_file
from journal_testkit import StreamCounter, fold_counts, read_counts

CHILD = Path(__file__).with_name("journal_child.py")
REPO_ROOT = Path(__file__).resolve().parents[2]


def start_child(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(CHILD.parent)])}
    return subprocess.Popen(
        [sys.executable, str(CHILD), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env,
    )


def wait_ready(child: subprocess.Popen) -> None:
    line = child.stdout.readline()
    assert line == "ready\n", f"child did not start: {line!r} {child.stderr.read()}"


def kill_after(child: subprocess.Popen, delay_s: float) -> list[tuple[int, str, int]]:
    """SIGKILL the child after `delay_s`; return the acks it printed, whole lines only."""
    time.sleep(delay_s)
    child.send_signal(signal.SIGKILL)
    output, _ = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    acks = []
    for line in output.splitlines(keepends=True):
        if line.startswith("ack ") and line.endswith("\n"):
            _, seq, stream, version = line.split()
            acks.append((int(seq), stream, int(version)))
    return acks


def stored_rows(path: Path) -> dict[int, tuple[str, int]]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT seq, stream, version FROM events").fetchall()
    finally:
        conn.close()
    return {seq: (stream, version) for seq, stream, version in rows}


def assert_streams_contiguous(rows: dict[int, tuple[str, int]]) -> None:
    versions: dict[str, list[int]] = {}
    for seq in sorted(rows):
        stream, version = rows[seq]
        versions.setdefault(stream, []).append(version)
    for stream, seen in versions.items():
        assert seen == list(range(1, len(seen) + 1)), f"stream {stream} has versions {seen}"


async def assert_projection_matches_rebuild(path: Path) -> None:
    live = read_counts(str(path))
    async with await EventStore.open(path, projections=[StreamCounter()]) as store:
        events = await store.read_all()
        await store.rebuild_projections()
    assert live == fold_counts(events)
    assert read_counts(str(path)) == live


async def test_sigkill_during_appends(tmp_path):
    path = tmp_path / "journal.db"
    rng = random.Random(1234)
    acknowledged: list[tuple[int, str, int]] = []

    for _ in range(15):
        child = start_child("torture", str(path))
        wait_ready(child)
        acknowledged += kill_after(child, rng.uniform(0.02, 0.4))

        result = verify_file(path)
        assert result.ok, result.reason
        rows = stored_rows(path)
        assert result.event_count == len(rows)
        for seq, stream, version in acknowledged:
            assert rows.get(seq) == (stream, version), f"acknowledged seq {seq} is missing"
        assert_streams_contiguous(rows)

    assert len(acknowledged) > 15
    await assert_projection_matches_rebuild(path)


async def test_projection_consistent_after_sigkill(tmp_path):
    path = tmp_path / "journal.db"
    for delay_s in (0.05, 0.15, 0.3):
        child = start_child("torture", str(path))
        wait_ready(child)
        kill_after(child, delay_s)
        await assert_projection_matches_rebuild(path)
    assert sum(events for events, _ in read_counts(str(path)).values()) > 0


async def test_two_processes_append_concurrently(tmp_path):
    path = tmp_path / "journal.db"
    count = 150
    async with await EventStore.open(path):
        pass
    children = [start_child("contend", str(path), name, str(count)) for name in ("a", "b")]
    for child in children:
        wait_ready(child)
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    outputs = [child.communicate(timeout=100) for child in children]

    for child, (_, stderr) in zip(children, outputs):
        assert child.returncode == 0, stderr
    conflicts = sum(int(out.splitlines()[-1].split()[1]) for out, _ in outputs)
    assert conflicts > 0
    assert all("conflict shared" in out for out, _ in outputs if "conflict" in out)

    async with await EventStore.open(path) as store:
        shared = await store.read_stream("shared")
        own = {name: await store.read_stream(f"own-{name}") for name in ("a", "b")}
        assert (await store.verify()).ok
        assert await store.last_seq() == 4 * count

    assert [e.version for e in shared] == list(range(1, 2 * count + 1))
    for name in ("a", "b"):
        written = sorted(e.data["i"] for e in shared if e.data["writer"] == name)
        assert written == list(range(count))
        assert [e.data["i"] for e in own[name]] == list(range(count))


async def test_held_write_lock_raises_journal_locked(tmp_path):
    path = tmp_path / "journal.db"
    async with await EventStore.open(path, busy_timeout_s=0.2) as store:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(JournalLocked) as caught:
                await store.append("job-1", [NewEvent("JobSubmitted", {})], expected_version=0)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()

        message = str(caught.value)
        assert str(path) in message
        assert "busy_timeout_s" in message
        recorded = await store.append("job-1", [NewEvent("JobSubmitted", {})],
                                      expected_version=0)
        assert recorded[0].seq == 1
