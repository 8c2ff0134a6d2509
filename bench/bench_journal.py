"""Benchmark the journal against baselines measured in the same run; prints a markdown table.

    python bench/bench_journal.py                       # the full run (about 80 s on 2 cores)
    python bench/bench_journal.py --events 20000 --replay-events 100000   # a quick one

1. Append: `--events` one-event appends from `--tasks` concurrent asyncio tasks, with the hash
   chain and a one-row-per-stream projection (one executemany per transaction through
   `apply_many`), at synchronous FULL and NORMAL; then at FULL with the projection's per-event
   `apply` only, and with 10 events per append. Baselines: sqlite3 executemany of the same
   rows in one transaction, and the same rows with one commit per `--tasks` rows (the
   transaction shape of one-event appends from that many tasks). Code that adds work to those
   inserts cannot beat that loop's ratio to executemany. The third baseline is the
   eventsourcing library's SQLite persistence with one save() per event, checked to run at
   synchronous FULL.
2. Replay: read `--replay-events` events of `--replay-streams` streams and fold them, against a
   plain sqlite3 read of the same rows with json.loads and the same fold.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from journal import EventStore, NewEvent, RecordedEvent  # noqa: E402
from journal.encoding import EVENT_COLUMNS  # noqa: E402
from journal.schema import configure_writer, migrate  # noqa: E402


_RAW_INSERT = f"INSERT INTO events ({EVENT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)"


_UPSERT_TOTAL = (
    "INSERT INTO stream_totals VALUES (?, ?) "
    "ON CONFLICT (stream) DO UPDATE SET total = total + excluded.total"
)


class StreamTotalsPerEvent:
    """The small projection of the append benchmark: one upserted row per stream."""

    name = "stream_totals"
    tables = ("stream_totals",)

    def create(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS stream_totals (stream TEXT PRIMARY KEY, total INTEGER)"
        )

    def apply(self, conn: sqlite3.Connection, event: RecordedEvent) -> None:
        conn.execute(_UPSERT_TOTAL, (event.stream, event.data["n"]))


class StreamTotals(StreamTotalsPerEvent):
    """The same projection, writing each transaction's events with one executemany."""

    def apply_many(self, conn: sqlite3.Connection, events: list[RecordedEvent]) -> None:
        conn.executemany(_UPSERT_TOTAL, [(event.stream, event.data["n"]) for event in events])


async def append_from_tasks(
    path: Path, events: int, tasks: int, synchronous: str, per_append: int = 1,
    projection: type[StreamTotalsPerEvent] = StreamTotals,
) -> float:
    """Return events/s of appends of `per_append` events from `tasks` concurrent tasks."""
    appends_per_task = events // tasks // per_append
    store = await EventStore.open(path, projections=[projection()], synchronous=synchronous)

    async def run_task(task: int) -> None:
        stream = f"job-{task}"
        for round_number in range(appends_per_task):
            version = round_number * per_append
            batch = [
                NewEvent("Ticked", {"n": version + i, "gpu": "A100", "dph": 1.25})
                for i in range(per_append)
            ]
            await store.append(stream, batch, expected_version=version)

    started = time.perf_counter()
    await asyncio.gather(*(run_task(task) for task in range(tasks)))
    elapsed_s = time.perf_counter() - started
    stats = store.stats
    await store.close()
    print(f"  {synchronous}, {per_append} per append: {stats.events} events in "
          f"{stats.transactions} transactions", file=sys.stderr)
    return stats.events / elapsed_s


def raw_executemany(source: Path, target: Path, synchronous: str) -> float:
    """Return events/s of inserting the rows of `source` into `target` with one executemany."""
    rows = _read_rows(source)
    conn = sqlite3.connect(target, isolation_level=None)
    configure_writer(conn, synchronous)
    migrate(conn, target)

    started = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(_RAW_INSERT, rows)
    conn.execute("COMMIT")
    elapsed_s = time.perf_counter() - started
    conn.close()
    return len(rows) / elapsed_s


def raw_group_commits(source: Path, target: Path, synchronous: str, rows_per_commit: int) -> float:
    """Return events/s of inserting the rows of `source` with one commit per `rows_per_commit`.

    This is the transaction shape that one-event appends from that many tasks produce: each
    commit holds one event of each of many streams. It is the bare-sqlite3 limit of that shape.
    """
    rows = _read_rows(source)
    conn = sqlite3.connect(target, isolation_level=None)
    configure_writer(conn, synchronous)
    migrate(conn, target)

    started = time.perf_counter()
    for start in range(0, len(rows), rows_per_commit):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(_RAW_INSERT, rows[start : start + rows_per_commit])
        conn.execute("COMMIT")
    elapsed_s = time.perf_counter() - started
    conn.close()
    return len(rows) / elapsed_s


def _read_rows(source: Path) -> list[tuple]:
    conn = sqlite3.connect(source)
    try:
        return conn.execute(f"SELECT {EVENT_COLUMNS} FROM events ORDER BY seq").fetchall()
    finally:
        conn.close()


def eventsourcing_saves(path: Path, events: int, streams: int) -> float:
    """Return events/s of eventsourcing's Application.save(), one event per save.

    The library leaves SQLite's synchronous setting at its default; the run checks that it is
    FULL (2) on the library's own connection, so both sides sync the WAL on every commit.
    """
    os.environ.update(PERSISTENCE_MODULE="eventsourcing.sqlite", SQLITE_DBNAME=str(path))
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate, event

    class Ticker(Aggregate):
        @event("Created")
        def __init__(self) -> None:
            self.total = 0

        @event("Ticked")
        def tick(self, n: int, gpu: str, dph: float) -> None:
            self.total += n

    app = Application()
    with app.recorder.datastore.transaction(commit=False) as cursor:
        cursor.execute("PRAGMA synchronous")
        synchronous = cursor.fetchone()[0]
    if synchronous != 2:
        raise SystemExit(f"eventsourcing runs with PRAGMA synchronous={synchronous}, not FULL (2)")
    started = time.perf_counter()
    tickers = [Ticker() for _ in range(streams)]
    for ticker in tickers:
        app.save(ticker)
    for i in range(events - streams):
        ticker = tickers[i % streams]
        ticker.tick(n=i, gpu="A100", dph=1.25)
        app.save(ticker)
    elapsed_s = time.perf_counter() - started
    app.close()
    return events / elapsed_s


async def build_replay_journal(path: Path, events: int, streams: int) -> None:
    store = await EventStore.open(path, synchronous="NORMAL")
    per_append = 100
    appends_per_stream = max(1, events // streams // per_append)

    async def fill(first: int, last: int) -> None:
        for stream in range(first, last):
            for round_number in range(appends_per_stream):
                batch = [NewEvent("Ticked", {"n": i, "gpu": "A100"}) for i in range(per_append)]
                await store.append(f"job-{stream}", batch,
                                   expected_version=round_number * per_append)

    step = max(1, streams // 100)
    await asyncio.gather(*(fill(s, min(s + step, streams)) for s in range(0, streams, step)))
    await store.close()


async def replay_store(path: Path) -> tuple[float, int]:
    store = await EventStore.open(path)
    totals: dict[str, int] = {}
    started = time.perf_counter()
    count = 0
    async for event in store.iter_all(batch_size=20_000):
        totals[event.stream] = totals.get(event.stream, 0) + event.data["n"]
        count += 1
    elapsed_s = time.perf_counter() - started
    await store.close()
    return count / elapsed_s, sum(totals.values())


def replay_raw(path: Path) -> tuple[float, int]:
    conn = sqlite3.connect(path)
    totals: dict[str, int] = {}
    started = time.perf_counter()
    count = 0
    cursor = conn.execute(f"SELECT {EVENT_COLUMNS} FROM events ORDER BY seq")
    while rows := cursor.fetchmany(20_000):
        for row in rows:
            data = json.loads(row[5])
            totals[row[1]] = totals.get(row[1], 0) + data["n"]
        count += len(rows)
    elapsed_s = time.perf_counter() - started
    conn.close()
    return count / elapsed_s, sum(totals.values())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="events in the append test")
    parser.add_argument("--tasks", type=int, default=100, help="concurrent appending tasks")
    parser.add_argument("--es-events", type=int, default=None,
                        help="events saved through eventsourcing (default: --events)")
    parser.add_argument("--replay-events", type=int, default=1_000_000)
    parser.add_argument("--replay-streams", type=int, default=10_000)
    return parser.parse_args()


async def main() -> None:
    args = parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-journal-"))
    results: list[tuple[str, float, str]] = []

    print("append ...", file=sys.stderr)
    for synchronous in ("FULL", "NORMAL"):
        journal_path = folder / f"append-{synchronous}.db"
        ours = await append_from_tasks(journal_path, args.events, args.tasks, synchronous)
        raw = raw_executemany(journal_path, folder / f"raw-{synchronous}.db", synchronous)
        results.append((f"append, synchronous={synchronous}: journal", ours, ""))
        results.append((f"append, synchronous={synchronous}: sqlite3 executemany", raw,
                        f"journal/raw = {ours / raw:.2f}"))
        shape = raw_group_commits(journal_path, folder / f"shape-{synchronous}.db", synchronous,
                                  args.tasks)
        results.append((f"append, synchronous={synchronous}: sqlite3, one commit per "
                        f"{args.tasks} rows", shape,
                        f"journal/raw = {ours / shape:.2f}; this loop/executemany = "
                        f"{shape / raw:.2f}"))
        if synchronous == "FULL":
            full = ours
    per_event = await append_from_tasks(folder / "append-apply.db", args.events, args.tasks,
                                        "FULL", projection=StreamTotalsPerEvent)
    results.append(("append, synchronous=FULL, projection without apply_many: journal",
                    per_event, ""))
    grouped = await append_from_tasks(folder / "append-10.db", args.events, args.tasks, "FULL", 10)
    grouped_raw = raw_executemany(folder / "append-10.db", folder / "raw-10.db", "FULL")
    results.append(("append 10 events per call, synchronous=FULL: journal", grouped,
                    f"journal/raw = {grouped / grouped_raw:.2f}"))
    es_events = args.es_events or args.events
    es = eventsourcing_saves(folder / "eventsourcing.db", es_events, args.tasks)
    results.append(("append, synchronous=FULL: eventsourcing save()", es,
                    f"journal/eventsourcing = {full / es:.1f}"))

    print("replay ...", file=sys.stderr)
    replay_path = folder / "replay.db"
    await build_replay_journal(replay_path, args.replay_events, args.replay_streams)
    ours_rate, ours_total = await replay_store(replay_path)
    raw_rate, raw_total = replay_raw(replay_path)
    assert ours_total == raw_total, (ours_total, raw_total)
    results.append(("replay and fold: journal iter_all", ours_rate, ""))
    results.append(("replay and fold: sqlite3 fetchmany + json.loads", raw_rate,
                    f"journal/raw = {ours_rate / raw_rate:.2f}"))

    print("| case | events/s | ratio |")
    print("|---|---:|---|")
    for case, rate, ratio in results:
        print(f"| {case} | {rate:,.0f} | {ratio} |")
    for item in folder.iterdir():
        item.unlink()
    folder.rmdir()


if __name__ == "__main__":
    asyncio.run(main())
