"""Benchmark replay through the job state machine and the supervisor's cold start.

    python bench/bench_replay.py                          # 1,000,000 events of 10,000 jobs
    python bench/bench_replay.py --events 100000 --jobs 1000   # a quick run

1. Replay: read every event through EventStore.iter_all (rows decoded, data parsed) and fold
   each job's state with gpujobs.states.next_state, against a plain sqlite3 fetchmany of the
   same rows with json.loads and a dict update per event. Both run in this process.
2. Cold start: a fresh Python process opens the journal, loads the supervisor's JobTable from
   the jobs and attempts tables, and catches up on newer events. The time runs from before the
   process is spawned to the moment it reports ready to reconcile.

The journal is generated directly: rows are encoded and hashed with the journal's own functions
and inserted with executemany in one transaction, together with the projection rows that
gpujobs.projections folds from the same events. Every job's history is legal for the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from journal import EventStore, RecordedEvent  # noqa: E402
from journal.encoding import EVENT_COLUMNS, GENESIS_HASH, canonical_json, chain_hash  # noqa: E402
from journal.schema import configure_writer, migrate  # noqa: E402

from gpujobs import events as ev  # noqa: E402
from gpujobs.projections import (  # noqa: E402
    ATTEMPT_COLUMNS, JOB_COLUMNS, JobsProjection, decode_row, fold_attempt, fold_job, label_for,
    write_row,
)
from gpujobs.states import JobState, next_state  # noqa: E402

LIVE_JOB_SHARE = 10  # one job in this many is left running, so the supervisor has work to load


def job_history(job_id: str, length: int, live: bool) -> list[ev.JobEvent]:
    """Build a legal history of `length` events (at least 8): start, checkpoints, costs, end.

    A finished job also has its instance destroyed, so the supervisor does not load it.
    """
    label = label_for(job_id, 1)
    history: list[ev.JobEvent] = [
        ev.JobSubmitted(job_id=job_id, name="bench", team=f"team-{int(job_id[-6:]) % 4}",
                        project="bench", profile_name="dev-test",
                        profile={"name": "dev-test", "max_dph": 0.25}, spec={"total_steps": 10**6}),
        ev.OfferSelected(1, 10349565, 22563, 152241, "RTX 4090", 1, 0.15, 0.92, None),
        ev.InstanceRequested(1, 10349565, label),
        ev.InstanceCreated(1, 30000051, label, 0.15),
        ev.WorkerStarted(1, 0),
    ]
    step = 0
    while len(history) < length - 3:
        step += 50
        history += [
            ev.CheckpointStarted(1, step),
            ev.CheckpointSaved(1, step, f"file:///ckpt/{job_id}/{step}", "ab" * 32, 228693),
            ev.CostAccrued(1, 30000051, 0.00025, 6.0, 0.15, 1796402612.0 + step),
        ]
    history = history[: length - 3]
    if live and JobState(_final_state(job_id, history)) is JobState.CHECKPOINTING:
        history.append(ev.CheckpointSaved(1, step, f"file:///ckpt/{job_id}/{step}", "ab" * 32, 1))
    if live:
        # A live job is still billing: pad with costs so every job has exactly `length` events.
        while len(history) < length:
            history.append(ev.CostAccrued(1, 30000051, 0.00025, 6.0, 0.15,
                                          1796402612.0 + step + len(history)))
    else:
        history += [
            ev.JobCompleted(1, step, {"loss": 0.1}),
            ev.InstanceDestroyRequested(1, 30000051, "job done"),
            ev.InstanceDestroyed(1, 30000051),
        ]
    return history


def _final_state(job_id: str, history: list[ev.JobEvent]) -> str:
    state = JobState.QUEUED
    for event in history[1:]:
        state = next_state(job_id, state, event.type_name())
    return state.value


def generate_journal(path: Path, events: int, jobs: int) -> int:
    """Write a journal of about `events` events over `jobs` jobs; return the event count."""
    per_job = max(6, events // jobs)
    histories = [job_history(f"job-{i:06d}", per_job, live=i % LIVE_JOB_SHARE == 0)
                 for i in range(jobs)]
    conn = sqlite3.connect(path, isolation_level=None)
    configure_writer(conn, "NORMAL")
    migrate(conn, path)
    conn.execute("BEGIN IMMEDIATE")
    JobsProjection().create(conn)
    rows, job_rows, attempt_rows = _rows(histories)
    conn.executemany(f"INSERT INTO events ({EVENT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)", rows)
    for row in job_rows.values():
        write_row(conn, "jobs", JOB_COLUMNS, row)
    for row in attempt_rows.values():
        write_row(conn, "attempts", ATTEMPT_COLUMNS, row)
    conn.execute("COMMIT")
    conn.close()
    return len(rows)


def _rows(histories: list[list[ev.JobEvent]]) -> tuple[list[tuple], dict, dict]:
    """Interleave the jobs round-robin, hash the rows, and fold the projection rows."""
    rows: list[tuple] = []
    jobs: dict[str, dict] = {}
    attempts: dict[tuple[str, int], dict] = {}
    seq, last_hash, recorded_at = 0, GENESIS_HASH, 1796402612.0
    for position in range(max(len(h) for h in histories)):
        for history in histories:
            if position >= len(history):
                continue
            event = history[position].to_new_event()
            stream = history[0].job_id
            seq += 1
            recorded_at += 0.001
            data_json = canonical_json(event.data)
            last_hash = chain_hash(last_hash, seq, stream, position + 1, event.type, 1,
                                   data_json, recorded_at)
            rows.append((seq, stream, position + 1, event.type, 1, data_json, recorded_at,
                         last_hash))
            recorded = RecordedEvent(seq, stream, position + 1, event.type, 1,
                                     json.loads(data_json), recorded_at, last_hash)
            jobs[stream] = fold_job(jobs.get(stream), recorded)
            if "attempt" in recorded.data:
                key = (stream, recorded.data["attempt"])
                updated = fold_attempt(attempts.get(key), recorded)
                if updated is not None:
                    attempts[key] = updated
    return rows, jobs, attempts


async def replay_through_machine(path: Path) -> tuple[float, dict[str, str]]:
    """Return events/s of iter_all plus next_state per event, and every job's final state."""
    store = await EventStore.open(path)
    states: dict[str, JobState] = {}
    count = 0
    started = time.perf_counter()
    async for event in store.iter_all(batch_size=20_000):
        state = states.get(event.stream)
        if state is None:
            states[event.stream] = JobState.QUEUED  # JobSubmitted opens the stream
        else:
            states[event.stream] = next_state(event.stream, state, event.type)
        count += 1
    elapsed_s = time.perf_counter() - started
    await store.close()
    return count / elapsed_s, {job: state.value for job, state in states.items()}


async def replay_projections(path: Path) -> tuple[float, dict, dict]:
    """Return events/s of iter_all plus the jobs and attempts folds, and the folded rows.

    This is the work of `gpujobs replay --all --check` and of a projection rebuild.
    """
    store = await EventStore.open(path)
    jobs: dict[str, dict] = {}
    attempts: dict[tuple[str, int], dict] = {}
    count = 0
    started = time.perf_counter()
    async for event in store.iter_all(batch_size=20_000):
        jobs[event.stream] = fold_job(jobs.get(event.stream), event)
        attempt = event.data.get("attempt")
        if attempt is not None:
            key = (event.stream, attempt)
            updated = fold_attempt(attempts.get(key), event)
            if updated is not None:
                attempts[key] = updated
        count += 1
    elapsed_s = time.perf_counter() - started
    await store.close()
    return count / elapsed_s, jobs, attempts


def stored_rows(path: Path) -> tuple[dict, dict]:
    """Return the jobs and attempts tables as the generator wrote them, keyed like the folds."""
    conn = sqlite3.connect(path)
    try:
        jobs = {row[0]: decode_row(JOB_COLUMNS, row)
                for row in conn.execute(f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs")}
        attempts = {(row[0], row[1]): decode_row(ATTEMPT_COLUMNS, row)
                    for row in conn.execute(f"SELECT {', '.join(ATTEMPT_COLUMNS)} FROM attempts")}
    finally:
        conn.close()
    return jobs, attempts


def replay_raw(path: Path) -> tuple[float, int]:
    """Return events/s of sqlite3 fetchmany + json.loads + a dict update per event."""
    conn = sqlite3.connect(path)
    folded: dict[str, dict] = {}
    count = 0
    started = time.perf_counter()
    cursor = conn.execute(f"SELECT {EVENT_COLUMNS} FROM events ORDER BY seq")
    while rows := cursor.fetchmany(20_000):
        for row in rows:
            folded.setdefault(row[1], {}).update(json.loads(row[5]))
        count += len(rows)
    elapsed_s = time.perf_counter() - started
    conn.close()
    return count / elapsed_s, len(folded)


_COLD_START_CHILD = """
import asyncio, sys, time
started = time.perf_counter()
from journal import EventStore
from gpujobs.projections import JobsProjection
from gpujobs.supervisor.state import JobTable

async def main():
    store = await EventStore.open(sys.argv[1], projections=[JobsProjection()])
    table = JobTable(store)
    await table.load()
    await table.catch_up()
    print("ready", len(table.jobs), time.perf_counter() - started, flush=True)
    await store.close()

asyncio.run(main())
"""


def cold_start(path: Path) -> tuple[float, float, int]:
    """Return (seconds from spawn to ready, seconds inside the child, live jobs loaded)."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", _COLD_START_CHILD, str(path)],
                             cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    line = child.stdout.readline()
    ready_s = time.perf_counter() - started
    child.wait(timeout=60)
    word, jobs, inside_s = line.split()
    if word != "ready":
        raise RuntimeError(f"cold start child printed {line!r}")
    return ready_s, float(inside_s), int(jobs)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events to generate")
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs they belong to")
    parser.add_argument("--cold-starts", type=int, default=3, help="cold starts to time")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-replay-"))
    path = folder / "journal.db"

    print("generating ...", file=sys.stderr)
    started = time.perf_counter()
    count = generate_journal(path, args.events, args.jobs)
    print(f"  {count} events in {time.perf_counter() - started:.1f} s", file=sys.stderr)

    print("replay ...", file=sys.stderr)
    machine_rate, states = asyncio.run(replay_through_machine(path))
    fold_rate, folded_jobs, folded_attempts = asyncio.run(replay_projections(path))
    raw_rate, raw_streams = replay_raw(path)
    stored = dict(sqlite3.connect(path).execute("SELECT job_id, state FROM jobs"))
    assert states == stored, "replayed states differ from the jobs table"
    assert raw_streams == len(stored)
    stored_jobs, stored_attempts = stored_rows(path)
    assert {k: decode_row(JOB_COLUMNS, tuple(v[c] for c in JOB_COLUMNS))
            for k, v in folded_jobs.items()} == stored_jobs, "folded jobs differ"
    assert {k: decode_row(ATTEMPT_COLUMNS, tuple(v[c] for c in ATTEMPT_COLUMNS))
            for k, v in folded_attempts.items()} == stored_attempts, "folded attempts differ"

    print("cold start ...", file=sys.stderr)
    starts = [cold_start(path) for _ in range(args.cold_starts)]
    ready_s, inside_s, live_jobs = min(starts)

    print(f"{count:,} events of {len(stored):,} jobs ({live_jobs:,} live)\n")
    print("| case | figure | ratio |")
    print("|---|---:|---|")
    print(f"| replay: iter_all + next_state per event | {machine_rate:,.0f} events/s | |")
    print(f"| replay: iter_all + jobs and attempts folds (`replay --all --check`) | "
          f"{fold_rate:,.0f} events/s | folds/raw = {fold_rate / raw_rate:.2f} |")
    print(f"| replay: sqlite3 fetchmany + json.loads + dict update | {raw_rate:,.0f} events/s "
          f"| machine/raw = {machine_rate / raw_rate:.2f} |")
    print(f"| cold start: spawn to ready to reconcile (best of {len(starts)}) | {ready_s:.2f} s "
          f"| {inside_s:.2f} s of it after interpreter start |")
    for item in folder.iterdir():
        item.unlink()
    folder.rmdir()


if __name__ == "__main__":
    main()
