"""Turn worker reports into journal events.

Reports are snapshots of the worker's whole status, so the events come from comparing a
report with the job's row: a lost or repeated report changes nothing.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from gpujobs import events as ev
from gpujobs.projections import WORKER_ERROR
from gpujobs.states import JobState, next_state
from worker.protocol import EXIT_BAD_CHECKPOINT, Report, ReportKind

if TYPE_CHECKING:
    from gpujobs.supervisor.core import Supervisor

log = logging.getLogger(__name__)
S = JobState
ACCEPTING = (S.PROVISIONING, S.RUNNING, S.CHECKPOINTING, S.RESUMED, S.PREEMPTED)


async def handle_report(sup: Supervisor, report: Report) -> str:
    """Record what a report shows; returns "ok", "stop" or "unknown" for the HTTP response."""
    table = sup.table
    job = table.jobs.get(report.job_id)
    if job is None:
        return "unknown"
    runtime = table.runtime_for(report.job_id)
    async with runtime.lock:
        job = table.jobs[report.job_id]
        state = JobState(job["state"])
        if report.attempt != int(job["attempt"]) or state not in ACCEPTING:
            return "ok" if state is S.DONE and report.kind is ReportKind.COMPLETED else "stop"
        _note(runtime, report)
        events = derive_events(job, report)
        if job["stop_reason"] or job["cancel_requested"]:
            # A stop we asked for is not a preemption: the job ends once the worker is down.
            events = [e for e in events if not isinstance(e, ev.PreemptionDetected)]
        if report.kind is ReportKind.COMPLETED:
            completion = await _completion(sup, job, report)
            if completion is not None:
                events.append(completion)
        if events:
            await sup.append(report.job_id, events)
        if any(isinstance(e, ev.PreemptionDetected) for e in events):
            runtime.preempted_at = time.time()
        job = table.jobs[report.job_id]
        return "stop" if job["cancel_requested"] or job["stop_reason"] else "ok"


def _note(runtime, report: Report) -> None:  # type: ignore[no-untyped-def]
    now = time.time()
    runtime.last_report_kind = report.kind.value
    runtime.last_checkpointing_step = report.checkpointing_step
    runtime.last_report_at = now
    runtime.attempt(report.attempt).reported_at = now
    runtime.unreachable_recorded = False
    if report.step > runtime.max_step:
        runtime.max_step = report.step
        runtime.progress_at = now
        runtime.stalled_recorded = False


def derive_events(job: dict, report: Report) -> list[ev.JobEvent]:
    """Events that move the job's row to what the report shows, in order."""
    attempt = report.attempt
    state = JobState(job["state"])
    out: list[ev.JobEvent] = []

    def add(event: ev.JobEvent) -> None:
        nonlocal state
        state = next_state(job["job_id"], state, event.type_name())
        out.append(event)

    resumed_from = int(job["resumed_from_step"] or 0)
    same_host_back = state is S.PREEMPTED and report.kind is ReportKind.STARTED
    if state is S.PROVISIONING or same_host_back:
        if report.resumed_from_step or same_host_back:
            uri = report.last_checkpoint.uri if report.last_checkpoint else None
            add(ev.JobResumed(attempt, report.resumed_from_step or 0, uri))
            resumed_from = report.resumed_from_step or 0
        else:
            add(ev.WorkerStarted(attempt, report.step))
    if state is S.RESUMED and report.step > resumed_from:
        add(ev.ProgressReported(attempt, report.step))
    last_step = job["last_checkpoint_step"]
    pending = report.checkpointing_step
    if pending is not None and state in (S.RUNNING, S.RESUMED) and (
        last_step is None or pending > last_step
    ):
        add(ev.CheckpointStarted(attempt, pending))
    saved = report.last_checkpoint
    if saved is not None and (last_step is None or saved.step > last_step):
        add(ev.CheckpointSaved(attempt, saved.step, saved.uri, saved.sha256, saved.size_bytes))
    if report.kind is ReportKind.STOPPING and state in (S.RUNNING, S.CHECKPOINTING, S.RESUMED):
        add(ev.PreemptionDetected(attempt, job["instance_id"], "sigterm", report.step,
                                  saved.step if saved else last_step))
    if report.kind is ReportKind.FAILED and state is not S.PREEMPTED:
        out.extend(_failure_events(job, report))
    return out


def _failure_events(job: dict, report: Report) -> list[ev.JobEvent]:
    """Fail the job for a checkpoint that does not load, else treat the failure as a preemption.

    The decision rests on the exit code alone: an error text that mentions a checkpoint key
    (a storage timeout on checkpoints/..., say) is a failure that a restart may fix.
    """
    error = report.error or "the worker reported a failure"
    if report.exit_code == EXIT_BAD_CHECKPOINT:
        return [ev.JobFailed(f"worker failed: {error}", report.attempt)]
    return [ev.PreemptionDetected(report.attempt, job["instance_id"], f"{WORKER_ERROR}: {error}",
                                  report.step, job["last_checkpoint_step"])]


async def _completion(sup: Supervisor, job: dict, report: Report) -> ev.JobCompleted | None:
    marker = await sup.completion_marker(job["job_id"])
    if marker is None:
        log.warning("job %s reported completion but has no valid completion marker in "
                    "storage yet", job["job_id"])
        return None
    return ev.JobCompleted(report.attempt, report.step, dict(report.metrics))
