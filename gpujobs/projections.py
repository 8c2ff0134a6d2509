"""Read models of jobs and attempts, folded from events by pure functions.

The same functions run in two places: inside the journal's append transaction (the SQL
projection below) and over the events alone (replay), so a difference between the two means
the stored read model was damaged, never that two implementations disagree.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from journal import RecordedEvent

from gpujobs.events import SUPERVISOR_STREAM
from gpujobs.states import JobState, next_state

JOB_COLUMNS = (
    "job_id", "name", "team", "project", "profile_name", "priority", "state", "version",
    "attempt", "instance_id", "step", "last_checkpoint_step", "last_checkpoint_uri",
    "resumed_from_step", "preemptions", "restarts", "cost_usd", "submitted_at", "updated_at",
    "finished_at", "reason", "cancel_requested", "stop_reason", "spec", "profile", "metrics",
    "last_seq",
)
ATTEMPT_COLUMNS = (
    "job_id", "attempt", "offer_id", "machine_id", "host_id", "gpu_name", "dph_total",
    "bid_price", "label", "instance_id", "status", "selected_at", "requested_at", "created_at",
    "destroyed_at", "billed_through", "cost_usd", "end_reason", "rate_class",
    "destroy_requested_at",
)
_JSON_COLUMNS = ("spec", "profile", "metrics")

# Attempt statuses, in the order an attempt normally passes through them.
SELECTED, REQUESTED, CREATED = "selected", "requested", "created"
CREATE_FAILED, DESTROY_REQUESTED, DESTROYED = "create_failed", "destroy_requested", "destroyed"
LIVE_ATTEMPT_STATUSES = (REQUESTED, CREATED, DESTROY_REQUESTED)
WORKER_ERROR = "worker_error"  # PreemptionDetected reason prefix for a crashed worker


def label_for(job_id: str, attempt: int) -> str:
    """Instance label that ties a rented machine to one attempt of one job."""
    return f"gpujobs:{job_id}:{attempt}"


def parse_label(label: str | None) -> tuple[str, int] | None:
    if not label or not label.startswith("gpujobs:"):
        return None
    _, _, rest = label.partition(":")
    job_id, _, attempt = rest.rpartition(":")
    if not job_id or not attempt.isdigit():
        return None
    return job_id, int(attempt)


def is_job_stream(stream: str) -> bool:
    return stream != SUPERVISOR_STREAM


def fold_job(row: dict[str, Any] | None, event: RecordedEvent) -> dict[str, Any] | None:
    """Return the job row after one event of its stream; None for the supervisor's stream."""
    if not is_job_stream(event.stream):
        return None
    data = event.data
    if row is None:
        if event.type != "JobSubmitted":
            raise ValueError(f"stream {event.stream} starts with {event.type}, not JobSubmitted")
        row = _new_job(event)
    else:
        row = dict(row)
        row["state"] = next_state(event.stream, JobState(row["state"]), event.type).value
    row["version"] = event.version
    row["updated_at"] = event.recorded_at
    row["last_seq"] = event.seq
    _JOB_FOLDS.get(event.type, _no_change)(row, data)
    if JobState(row["state"]).is_terminal and row["finished_at"] is None:
        row["finished_at"] = event.recorded_at
    return row


def _new_job(event: RecordedEvent) -> dict[str, Any]:
    data = event.data
    row = {column: None for column in JOB_COLUMNS}
    row.update(
        job_id=event.stream, name=data["name"], team=data["team"], project=data["project"],
        profile_name=data["profile_name"], priority=int(data.get("priority", 0)),
        state=JobState.QUEUED.value, attempt=0, step=0, preemptions=0, restarts=0,
        cost_usd=0.0, submitted_at=event.recorded_at, cancel_requested=0,
        spec=data["spec"], profile=data["profile"], metrics={},
    )
    return row


def _no_change(row: dict[str, Any], data: dict[str, Any]) -> None:
    return None


def _offer_selected(row: dict[str, Any], data: dict[str, Any]) -> None:
    row["attempt"] = data["attempt"]
    row["instance_id"] = None
    row["reason"] = None


def _instance_created(row: dict[str, Any], data: dict[str, Any]) -> None:
    if data["attempt"] == row["attempt"]:
        row["instance_id"] = data["instance_id"]


def _instance_destroyed(row: dict[str, Any], data: dict[str, Any]) -> None:
    if data["attempt"] == row["attempt"]:
        row["instance_id"] = None


def _progress(row: dict[str, Any], data: dict[str, Any]) -> None:
    row["step"] = max(int(row["step"] or 0), int(data["step"]))


def _resumed(row: dict[str, Any], data: dict[str, Any]) -> None:
    row["resumed_from_step"] = data["from_step"]
    row["step"] = data["from_step"]


def _checkpoint_saved(row: dict[str, Any], data: dict[str, Any]) -> None:
    if row["last_checkpoint_step"] is None or data["step"] >= row["last_checkpoint_step"]:
        row["last_checkpoint_step"] = data["step"]
        row["last_checkpoint_uri"] = data["uri"]
    _progress(row, data)


def _preempted(row: dict[str, Any], data: dict[str, Any]) -> None:
    # A worker that crashed counts against max_restarts; a lost machine never does.
    if data["reason"].startswith(WORKER_ERROR):
        row["restarts"] += 1
    else:
        row["preemptions"] += 1
    row["reason"] = data["reason"]


def _provisioning_failed(row: dict[str, Any], data: dict[str, Any]) -> None:
    if data["reason"].startswith(WORKER_ERROR):
        row["restarts"] += 1
    row["reason"] = data["reason"]


def _recovery_deferred(row: dict[str, Any], data: dict[str, Any]) -> None:
    row["reason"] = data["reason"]


def _cost(row: dict[str, Any], data: dict[str, Any]) -> None:
    row["cost_usd"] = row["cost_usd"] + float(data["amount_usd"])


def _completed(row: dict[str, Any], data: dict[str, Any]) -> None:
    row["metrics"] = dict(data.get("metrics") or {})
    _progress(row, data)
    row["reason"] = None


def _ended(row: dict[str, Any], data: dict[str, Any]) -> None:
    row["reason"] = data.get("reason")


def _cancel_requested(row: dict[str, Any], data: dict[str, Any]) -> None:
    row["cancel_requested"] = 1


def _stop_requested(row: dict[str, Any], data: dict[str, Any]) -> None:
    row["stop_reason"] = data["reason"]


_JOB_FOLDS = {
    "OfferSelected": _offer_selected,
    "InstanceCreated": _instance_created,
    "InstanceDestroyed": _instance_destroyed,
    "WorkerStarted": _progress,
    "ProgressReported": _progress,
    "CheckpointStarted": _progress,
    "JobResumed": _resumed,
    "CheckpointSaved": _checkpoint_saved,
    "PreemptionDetected": _preempted,
    "ProvisioningFailed": _provisioning_failed,
    "RecoveryDeferred": _recovery_deferred,
    "CostAccrued": _cost,
    "JobCompleted": _completed,
    "JobFailed": _ended,
    "JobCancelled": _ended,
    "CancelRequested": _cancel_requested,
    "StopRequested": _stop_requested,
}


def fold_attempt(row: dict[str, Any] | None, event: RecordedEvent) -> dict[str, Any] | None:
    """Return the attempt row after an event, or None if the event is not about an attempt."""
    fold = _ATTEMPT_FOLDS.get(event.type)
    if fold is None:
        return None
    data = event.data
    if row is None:
        row = {column: None for column in ATTEMPT_COLUMNS}
        row.update(job_id=event.stream, attempt=data["attempt"], cost_usd=0.0, status=SELECTED)
    else:
        row = dict(row)
    fold(row, data, event.recorded_at)
    return row


def _attempt_selected(row: dict[str, Any], data: dict[str, Any], at: float) -> None:
    row.update(
        offer_id=data["offer_id"], machine_id=data.get("machine_id"), host_id=data.get("host_id"),
        gpu_name=data.get("gpu_name"), dph_total=data.get("dph_total"),
        bid_price=data.get("bid_price"), selected_at=at,
    )


def _attempt_requested(row: dict[str, Any], data: dict[str, Any], at: float) -> None:
    row.update(status=REQUESTED, label=data["label"], offer_id=data["offer_id"], requested_at=at)


def billing_start(requested_at: float | None, data: dict[str, Any], at: float) -> float:
    """Return when an attempt's billing starts, from its InstanceCreated data.

    The API creates the instance and starts billing while the create call runs. The reply
    comes later, and for an adopted instance a restarted supervisor later still, so billing
    starts when the call was sent. An adopted instance has no such moment, so its billing
    starts at the intent, which was appended just before the call.
    """
    return data.get("billed_from") or requested_at or at


def _attempt_created(row: dict[str, Any], data: dict[str, Any], at: float) -> None:
    start = billing_start(row["requested_at"], data, at)
    row.update(
        status=CREATED, instance_id=data["instance_id"], label=data["label"],
        dph_total=data["dph_total"], created_at=at, billed_through=start,
    )


def _attempt_create_failed(row: dict[str, Any], data: dict[str, Any], at: float) -> None:
    row.update(status=CREATE_FAILED, end_reason=data["message"], destroyed_at=at)


def _attempt_destroy_requested(row: dict[str, Any], data: dict[str, Any], at: float) -> None:
    row.update(status=DESTROY_REQUESTED, instance_id=data["instance_id"],
               end_reason=data["reason"], destroy_requested_at=at)


def _attempt_destroyed(row: dict[str, Any], data: dict[str, Any], at: float) -> None:
    row.update(status=DESTROYED, destroyed_at=at)


def _attempt_cost(row: dict[str, Any], data: dict[str, Any], at: float) -> None:
    row["cost_usd"] = row["cost_usd"] + float(data["amount_usd"])
    row["billed_through"] = data["through"]
    if data.get("rate_class"):
        row["rate_class"] = data["rate_class"]


_ATTEMPT_FOLDS = {
    "OfferSelected": _attempt_selected,
    "InstanceRequested": _attempt_requested,
    "InstanceCreated": _attempt_created,
    "InstanceCreateFailed": _attempt_create_failed,
    "InstanceDestroyRequested": _attempt_destroy_requested,
    "InstanceDestroyed": _attempt_destroyed,
    "CostAccrued": _attempt_cost,
}


class JobsProjection:
    """The `jobs` and `attempts` tables, kept in step with the journal inside each append."""

    name = "jobs"
    tables = ("jobs", "attempts")

    def create(self, conn: sqlite3.Connection) -> None:
        job_columns = ", ".join(
            f"{c} TEXT PRIMARY KEY" if c == "job_id" else c for c in JOB_COLUMNS
        )
        conn.execute(f"CREATE TABLE IF NOT EXISTS jobs ({job_columns})")
        conn.execute("CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state)")
        attempt_columns = ", ".join(ATTEMPT_COLUMNS)
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS attempts ({attempt_columns}, "
            "PRIMARY KEY (job_id, attempt))"
        )
        conn.execute("CREATE INDEX IF NOT EXISTS attempts_status ON attempts(status)")
        from gpujobs.views import create_views  # the views read these tables

        create_views(conn)

    def apply(self, conn: sqlite3.Connection, event: RecordedEvent) -> None:
        if not is_job_stream(event.stream):
            return
        job = load_job_row(conn, event.stream)
        write_changes(conn, "jobs", JOB_COLUMNS, ("job_id",), job, fold_job(job, event))
        if "attempt" not in event.data:
            return
        attempt = load_attempt_row(conn, event.stream, int(event.data["attempt"]))
        updated = fold_attempt(attempt, event)
        if updated is not None:
            write_changes(conn, "attempts", ATTEMPT_COLUMNS, ("job_id", "attempt"), attempt,
                          updated)


def load_job_row(conn: sqlite3.Connection, job_id: str) -> dict[str, Any] | None:
    """Return the stored row with its JSON columns still encoded.

    The folds only ever replace spec, profile and metrics, never read them, and
    `write_changes` leaves a column that still contains the stored text alone, so decoding them
    for every event would be wasted.
    """
    cursor = conn.execute(f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs WHERE job_id = ?", (job_id,))
    values = cursor.fetchone()
    return None if values is None else dict(zip(JOB_COLUMNS, values))


def load_attempt_row(conn: sqlite3.Connection, job_id: str, attempt: int) -> dict[str, Any] | None:
    cursor = conn.execute(
        f"SELECT {', '.join(ATTEMPT_COLUMNS)} FROM attempts WHERE job_id = ? AND attempt = ?",
        (job_id, attempt),
    )
    values = cursor.fetchone()
    return None if values is None else decode_row(ATTEMPT_COLUMNS, values)


def decode_row(columns: tuple[str, ...], values: tuple[Any, ...]) -> dict[str, Any]:
    row = dict(zip(columns, values))
    for column in _JSON_COLUMNS:
        if column in row and isinstance(row[column], str):
            row[column] = json.loads(row[column])
    return row


def write_row(conn: sqlite3.Connection, table: str, columns: tuple[str, ...],
              row: dict[str, Any]) -> None:
    values = [
        json.dumps(row[c], sort_keys=True) if c in _JSON_COLUMNS else row[c] for c in columns
    ]
    placeholders = ", ".join("?" for _ in columns)
    conn.execute(
        f"INSERT OR REPLACE INTO {table} ({', '.join(columns)}) VALUES ({placeholders})", values
    )


def write_changes(conn: sqlite3.Connection, table: str, columns: tuple[str, ...],
                  key: tuple[str, ...], old: dict[str, Any] | None, new: dict[str, Any]) -> None:
    """Write `new` over `old`: the whole row if it is new, else only the columns that changed.

    Most events change a few counters of a job, and rewriting the whole row would encode its
    spec and profile as JSON again for each of them.
    """
    if old is None:
        write_row(conn, table, columns, new)
        return
    changed = [c for c in columns if new[c] != old[c]]
    if not changed:
        return
    values = [json.dumps(new[c], sort_keys=True) if c in _JSON_COLUMNS else new[c]
              for c in changed]
    assignments = ", ".join(f"{c} = ?" for c in changed)
    where = " AND ".join(f"{c} = ?" for c in key)
    conn.execute(f"UPDATE {table} SET {assignments} WHERE {where}",
                 [*values, *(old[c] for c in key)])


def fold_all(events: list[RecordedEvent]) -> tuple[dict[str, dict], dict[tuple[str, int], dict]]:
    """Fold events in journal order into job and attempt rows, from nothing but the events."""
    jobs: dict[str, dict[str, Any]] = {}
    attempts: dict[tuple[str, int], dict[str, Any]] = {}
    for event in events:
        if not is_job_stream(event.stream):
            continue
        jobs[event.stream] = fold_job(jobs.get(event.stream), event)
        if "attempt" in event.data:
            key = (event.stream, int(event.data["attempt"]))
            updated = fold_attempt(attempts.get(key), event)
            if updated is not None:
                attempts[key] = updated
    return jobs, attempts
