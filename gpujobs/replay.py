"""Rebuild a job's history from its events alone, through the state machine.

`replay_job` never reads the projection tables: what it prints comes from the events alone, so it
can be compared with them (`check_projections`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from journal import EventStore, RecordedEvent

from gpujobs.audit import iso_utc
from gpujobs.errors import GpujobsError, JobNotFound
from gpujobs.projections import (
    ATTEMPT_COLUMNS, JOB_COLUMNS, decode_row, fold_all, fold_attempt, fold_job, is_job_stream,
)
from gpujobs.states import JobMachine, JobState, TRANSITION_EVENTS


@dataclass
class Replay:
    job_id: str
    state: str
    attempts: int
    transitions: list[dict[str, Any]] = field(default_factory=list)
    states_visited: list[str] = field(default_factory=list)
    last_checkpoint_step: int | None = None
    last_checkpoint_uri: str | None = None
    resumed_from_step: int | None = None
    preemptions: int = 0
    cost_usd: float = 0.0
    event_count: int = 0
    as_of: float | None = None
    attempt_rows: list[dict[str, Any]] = field(default_factory=list)
    row: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id, "state": self.state, "attempts": self.attempts,
            "transitions": self.transitions, "states_visited": self.states_visited,
            "last_checkpoint_step": self.last_checkpoint_step,
            "last_checkpoint_uri": self.last_checkpoint_uri,
            "resumed_from_step": self.resumed_from_step, "preemptions": self.preemptions,
            "cost_usd": self.cost_usd, "event_count": self.event_count, "as_of": self.as_of,
            "instances": [
                {k: r[k] for k in ("attempt", "instance_id", "status", "gpu_name", "dph_total",
                                   "cost_usd", "end_reason")}
                for r in self.attempt_rows
            ],
        }


def replay_events(job_id: str, events: list[RecordedEvent], *, at: float | None = None) -> Replay:
    machine: JobMachine | None = None
    row: dict[str, Any] | None = None
    attempts: dict[int, dict[str, Any]] = {}
    result = Replay(job_id=job_id, state="", attempts=0, as_of=at)
    for event in events:
        if at is not None and event.recorded_at > at:
            break
        if machine is None:
            machine = JobMachine(job_id)
            result.states_visited.append(machine.state)
        before = machine.state
        machine.apply(event.type)
        row = fold_job(row, event)
        if "attempt" in event.data:
            updated = fold_attempt(attempts.get(int(event.data["attempt"])), event)
            if updated is not None:
                attempts[int(event.data["attempt"])] = updated
        result.event_count += 1
        if event.type in TRANSITION_EVENTS and machine.state != before:
            result.transitions.append({
                "from": before, "to": machine.state, "event": event.type,
                "at": event.recorded_at, "attempt": event.data.get("attempt", row["attempt"]),
                "seq": event.seq,
            })
            result.states_visited.append(machine.state)
    if machine is None or row is None:
        if at is None or not events:
            raise ValueError(f"replay of job {job_id} got no events")
        first = events[0].recorded_at
        raise GpujobsError(
            f"job {job_id} has no events at or before {iso_utc(at)}; its first event was "
            f"recorded at {iso_utc(first)}, so give a later --at"
        )
    if machine.state != row["state"]:
        raise AssertionError(f"state machine says {machine.state}, fold says {row['state']}")
    result.state = machine.state
    result.row = row
    result.attempts = int(row["attempt"])
    result.last_checkpoint_step = row["last_checkpoint_step"]
    result.last_checkpoint_uri = row["last_checkpoint_uri"]
    result.resumed_from_step = row["resumed_from_step"]
    result.preemptions = int(row["preemptions"])
    result.cost_usd = float(row["cost_usd"])
    result.attempt_rows = [attempts[k] for k in sorted(attempts)]
    return result


async def replay_job(store: EventStore, job_id: str, *, at: float | None = None,
                     journal_path: str = "") -> Replay:
    if not is_job_stream(job_id):
        raise GpujobsError(
            f"{job_id!r} is the supervisor's own stream, not a job; list its events with "
            f"`gpujobs audit --job {job_id}`"
        )
    events = await store.read_stream(job_id)
    if not events:
        raise JobNotFound(job_id, journal_path)
    return replay_events(job_id, events, at=at)


@dataclass(frozen=True)
class Difference:
    table: str
    key: str
    column: str
    stored: Any
    replayed: Any


async def check_projections(store: EventStore) -> tuple[int, list[Difference]]:
    """Fold all events from nothing and compare with the stored tables, cell by cell."""
    events = await store.read_all()
    jobs, attempts = fold_all(events)
    differences: list[Difference] = []
    stored_jobs = {
        row["job_id"]: row for row in (
            decode_row(JOB_COLUMNS, tuple(r))
            for r in await store.query(f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs")
        )
    }
    differences += _compare("jobs", stored_jobs, jobs, JOB_COLUMNS)
    stored_attempts = {
        (row["job_id"], row["attempt"]): row for row in (
            decode_row(ATTEMPT_COLUMNS, tuple(r))
            for r in await store.query(f"SELECT {', '.join(ATTEMPT_COLUMNS)} FROM attempts")
        )
    }
    differences += _compare("attempts", stored_attempts, attempts, ATTEMPT_COLUMNS)
    return len(events), differences


def _compare(table: str, stored: dict, replayed: dict, columns: tuple[str, ...]) -> list[Difference]:
    out = []
    for key in sorted(set(stored) | set(replayed), key=str):
        left, right = stored.get(key), replayed.get(key)
        if left is None or right is None:
            out.append(Difference(table, str(key), "*", left is not None, right is not None))
            continue
        for column in columns:
            if left[column] != right[column]:
                out.append(Difference(table, str(key), column, left[column], right[column]))
    return out


def state_at(replay: Replay) -> JobState:
    return JobState(replay.state)
