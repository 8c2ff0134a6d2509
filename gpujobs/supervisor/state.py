"""The supervisor's memory: job and attempt rows folded from the journal, plus runtime facts.

Rows here are what the projection contains, because both come from the same fold functions, with
one difference: a job's spec, profile and metrics are kept beside its row (`JobTable.spec`,
`profile`, `metrics`). CPython's garbage collector does not track a row of plain values, and a
fold copies the row on every event, so at 10,000 jobs rows that held dicts would fill the
collector's oldest generation and bring on full collections.

Runtime facts (the last report, when progress was last seen) are not journaled; after a restart
they start empty and fill again within one heartbeat interval. The start of a wait with a
deadline is the exception: it is rebuilt from the event that began the wait.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from journal import EventStore, RecordedEvent

from gpujobs.projections import (
    ATTEMPT_COLUMNS, JOB_COLUMNS, LIVE_ATTEMPT_STATUSES, decode_row, fold_attempt, fold_job,
)
from gpujobs.states import TERMINAL_STATES, TERMINAL_VALUES, JobState

transitions_log = logging.getLogger("gpujobs.transitions")

# Events that begin a wait with a deadline: the emergency-checkpoint grace, and for an outbid
# instance the wait for the same host to resume it.
WAIT_START_EVENTS = ("PreemptionDetected", "StopRequested")

# The JSON columns of a job row, kept in JobTable beside the row.
SIDE_COLUMNS = ("spec", "profile", "metrics")


@dataclass
class AttemptRuntime:
    """Per-attempt facts the supervisor keeps in memory between ticks."""

    # When a DELETE the API accepted was sent. Absence from a later list confirms the destroy.
    destroy_sent_at: float | None = None
    destroy_retry_at: float = 0.0
    destroy_failures: int = 0
    missing_lists: int = 0  # consecutive complete lists that did not show the instance
    rate_class: str | None = None  # "gpu" or "storage": what the instance was last billed at
    rate_seen_at: float | None = None  # when a list last showed the instance at that rate
    reported_at: float | None = None  # when this attempt's worker last reported
    storage_dph: float = 0.0
    status_msg: str | None = None  # last status message seen, to tell a slow load from a stuck one
    status_changed_at: float = field(default_factory=time.time)
    rebid_sent: bool = False
    running_since: float | None = None  # first tick that saw the instance running


@dataclass
class JobRuntime:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The kind and checkpointing step of the last report, not the report itself. At 10,000
    # jobs the stored reports, replaced every heartbeat interval, would each reach the garbage
    # collector's oldest generation and bring on full collections sooner.
    last_report_kind: str | None = None
    last_checkpointing_step: int | None = None
    last_report_at: float = field(default_factory=time.time)
    progress_at: float = field(default_factory=time.time)
    max_step: int = -1
    unreachable_recorded: bool = False
    stalled_recorded: bool = False
    # When the current wait began: the recorded_at of the job's last PreemptionDetected or
    # StopRequested. The emergency-checkpoint grace and the wait for the same host count from it.
    preempted_at: float | None = None
    backoff_until: float = 0.0
    wait_reason: str | None = None
    mailbox_sent_at: float = 0.0  # sent_at of the last mailbox report handled
    attempts: dict[int, AttemptRuntime] = field(default_factory=dict)

    def start_attempt(self) -> None:
        """Forget the previous attempt's reports, so the new worker's timeouts count afresh."""
        now = time.time()
        self.last_report_kind = None
        self.last_checkpointing_step = None
        self.last_report_at = now
        self.progress_at = now
        self.max_step = -1
        self.unreachable_recorded = False
        self.stalled_recorded = False

    def attempt(self, number: int) -> AttemptRuntime:
        state = self.attempts.get(number)
        if state is None:
            state = self.attempts[int(number)] = AttemptRuntime()
        return state


class JobTable:
    """Jobs and attempts in memory, kept equal to the journal by folding every new event."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.jobs: dict[str, dict[str, Any]] = {}
        self.attempts: dict[str, dict[int, dict[str, Any]]] = {}  # job id -> attempt -> row
        # The rows of `attempts` whose status is live, kept by every change to `attempts`, so
        # that a tick lists the live instances without a pass over every job.
        self.live: dict[tuple[str, int], dict[str, Any]] = {}
        self.runtime: dict[str, JobRuntime] = {}
        self.order: list[str] = []  # job ids by priority, kept by ordered_jobs
        # Each job's spec, profile and metrics, by column then job id. Equal dicts are shared.
        self._side: dict[str, dict[str, dict[str, Any]]] = {column: {} for column in SIDE_COLUMNS}
        self._shared: dict[int, dict[str, Any]] = {}  # spec and profile dicts, by content
        self.seq = 0
        self._lock = asyncio.Lock()

    async def load(self) -> None:
        """Read live jobs from the projection: a cold start costs one query, not a replay."""
        self.seq = await self.store.last_seq()
        rows = await self.store.query(
            f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs WHERE state NOT IN (?, ?, ?) "
            "OR job_id IN (SELECT job_id FROM attempts WHERE status IN (?, ?, ?))",
            (*[s.value for s in TERMINAL_STATES], *LIVE_ATTEMPT_STATUSES),
        )
        for values in rows:
            self._keep(decode_row(JOB_COLUMNS, tuple(values)))
        attempt_rows = await self.store.query(
            f"SELECT {', '.join(ATTEMPT_COLUMNS)} FROM attempts"
            " WHERE job_id IN (SELECT job_id FROM jobs WHERE state NOT IN (?, ?, ?))"
            " OR status IN (?, ?, ?)",
            (*[s.value for s in TERMINAL_STATES], *LIVE_ATTEMPT_STATUSES),
        )
        for values in attempt_rows:
            row = decode_row(ATTEMPT_COLUMNS, tuple(values))
            self._put_attempt(row["job_id"], row["attempt"], row)
        await self._load_wait_starts()

    async def _load_wait_starts(self) -> None:
        """Rebuild when each preempted or stopping job's wait began, from the journal.

        Without it a restart would restart every wait, and a job waiting for its instance to
        resume on the same host would wait again in full, its stopped instance billing storage.
        """
        waiting = {job_id for job_id, job in self.jobs.items()
                   if job["state"] == JobState.PREEMPTED.value
                   or (job["stop_reason"] and job["state"] not in TERMINAL_VALUES)}
        if not waiting:
            return
        rows = await self.store.query(
            "SELECT stream, MAX(recorded_at) FROM events WHERE type IN (?, ?) GROUP BY stream",
            WAIT_START_EVENTS,
        )
        for stream, started_at in rows:
            if stream in waiting and started_at is not None:
                self.runtime_for(stream).preempted_at = float(started_at)

    async def catch_up(self) -> list[RecordedEvent]:
        """Fold every event appended since the last call, by anyone."""
        async with self._lock:
            events = await self.store.read_all(from_seq=self.seq + 1)
            for event in events:
                await self._fold(event)
                self.seq = event.seq
            return events

    async def fold_appended(self, events: list[RecordedEvent]) -> None:
        """Fold events this process just appended, reading the journal only when needed.

        The append returns the events as stored, so when they directly follow the last folded
        event they are folded as they are. When another writer appended in between, or they
        were folded already, this is `catch_up`.
        """
        async with self._lock:
            if events and events[0].seq == self.seq + 1:
                for event in events:
                    await self._fold(event)
                    self.seq = event.seq
                return
            if events and events[-1].seq <= self.seq:
                return
        await self.catch_up()

    async def _fold(self, event: RecordedEvent) -> None:
        job = self.jobs.get(event.stream)
        if job is None and event.type != "JobSubmitted":
            job = await self._load_job(event.stream)
            if job is None:
                return
        if job is not None and event.seq <= job["last_seq"]:
            return  # already in the row loaded at start
        before = job["state"] if job else None
        job = self._keep(fold_job(job, event))
        runtime = self.runtime_for(event.stream)
        if event.type in WAIT_START_EVENTS:
            runtime.preempted_at = event.recorded_at
        if event.type == "ProvisioningFailed":
            retry_at = event.recorded_at + float(event.data.get("retry_after_s") or 0.0)
            runtime.backoff_until = max(runtime.backoff_until, retry_at)
        self._fold_attempt(event)
        if before is not None and before != job["state"]:
            transitions_log.info(
                "job %s attempt %s: %s -> %s (%s)",
                event.stream, job["attempt"], before, job["state"], event.type,
            )
        elif before is None:
            transitions_log.info("job %s submitted: queued (profile %s)", event.stream,
                                 job["profile_name"])

    def _keep(self, row: dict[str, Any]) -> dict[str, Any]:
        """Store a folded job row, moving its spec, profile and metrics beside it."""
        if any(column in row for column in SIDE_COLUMNS):
            job_id = row["job_id"]
            for column in SIDE_COLUMNS:
                if column in row:
                    value = row[column] or {}
                    shared = value if column == "metrics" else self._shared_copy(value)
                    self._side[column][job_id] = shared
            # A new dict of plain values, which CPython's garbage collector does not track.
            row = {key: value for key, value in row.items() if key not in SIDE_COLUMNS}
        self.jobs[row["job_id"]] = row
        return row

    def _shared_copy(self, value: dict[str, Any]) -> dict[str, Any]:
        """Return an equal spec or profile dict already in memory, or value itself.

        Jobs of one profile, and often of one template, carry equal dicts; one copy of each
        saves kilobytes per job at thousands of jobs. The shared dicts are never modified.
        """
        key = hash(json.dumps(value, sort_keys=True))
        existing = self._shared.setdefault(key, value)
        return existing if existing == value else value

    def spec(self, job_id: str) -> dict[str, Any]:
        """Return the job's spec as submitted; the caller must not modify it."""
        return self._side["spec"][job_id]

    def profile(self, job_id: str) -> dict[str, Any]:
        """Return the job's GPU profile as submitted; the caller must not modify it."""
        return self._side["profile"][job_id]

    def metrics(self, job_id: str) -> dict[str, Any]:
        """Return the metrics the job completed with, empty until it completes."""
        return self._side["metrics"][job_id]

    async def ensure_loaded(self, job_id: str) -> bool:
        """Bring a job that ended before this start back into memory; False if unknown."""
        if job_id in self.jobs:
            return True
        async with self._lock:
            if job_id in self.jobs:  # a fold loaded it while this waited for the lock
                return True
            job = await self._load_job(job_id)
            if job is None:
                return False
            self._keep(job)
            return True

    async def _load_job(self, job_id: str) -> dict[str, Any] | None:
        """Rebuild a job that is not in memory (it ended before this start) from its stream.

        Its attempt rows are replaced only after the read, so that readers never see a job
        without them.
        """
        events = await self.store.read_stream(job_id)
        rebuilt: dict[str, Any] | None = None
        attempts: dict[int, dict[str, Any]] = {}
        for event in events:
            if event.seq > self.seq:
                break
            rebuilt = fold_job(rebuilt, event)
            if "attempt" in event.data:
                number = int(event.data["attempt"])
                row = fold_attempt(attempts.get(number), event)
                if row is not None:
                    attempts[number] = row
        for number in self.attempts.pop(job_id, {}):
            self.live.pop((job_id, number), None)
        for number, row in attempts.items():
            self._put_attempt(job_id, number, row)
        return rebuilt

    def _fold_attempt(self, event: RecordedEvent) -> None:
        if "attempt" not in event.data:
            return
        attempt = int(event.data["attempt"])
        updated = fold_attempt(self.attempts.get(event.stream, {}).get(attempt), event)
        if updated is not None:
            self._put_attempt(event.stream, attempt, updated)

    def _put_attempt(self, job_id: str, attempt: int, row: dict[str, Any]) -> None:
        self.attempts.setdefault(job_id, {})[attempt] = row
        if row["status"] in LIVE_ATTEMPT_STATUSES:
            self.live[(job_id, attempt)] = row
        else:
            self.live.pop((job_id, attempt), None)

    def attempt_row(self, job_id: str, attempt: int | None = None) -> dict[str, Any] | None:
        number = self.jobs[job_id]["attempt"] if attempt is None else attempt
        return self.attempts.get(job_id, {}).get(number)

    def all_live_attempts(self) -> dict[tuple[str, int], dict[str, Any]]:
        """Return a copy of the live attempts, (job id, attempt) to row, that folds leave alone."""
        return dict(self.live)

    def live_attempts(self, job_id: str) -> list[dict[str, Any]]:
        return [
            row for row in self.attempts.get(job_id, {}).values()
            if row["status"] in LIVE_ATTEMPT_STATUSES
        ]

    def state(self, job_id: str) -> JobState:
        return JobState(self.jobs[job_id]["state"])

    def runtime_for(self, job_id: str) -> JobRuntime:
        runtime = self.runtime.get(job_id)
        if runtime is None:  # not setdefault: building a JobRuntime costs a lock each call
            runtime = self.runtime[job_id] = JobRuntime()
        return runtime
