"""Per-job decisions on each tick, by state: provision, watch, recover, clean up."""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from gpujobs import events as ev
from gpujobs.offers import RankedOffer
from gpujobs.projections import CREATED, DESTROY_REQUESTED, LIVE_ATTEMPT_STATUSES, REQUESTED
from gpujobs.states import TERMINAL_VALUES, JobState
from gpujobs.supervisor import instances as inst
from gpujobs.supervisor import provision, recovery, watch
from gpujobs.supervisor.state import AttemptRuntime, JobTable
from gpujobs.vast.records import Instance

if TYPE_CHECKING:
    from gpujobs.supervisor.core import Supervisor
    from gpujobs.supervisor.reconcile import InstanceView

S = JobState
WATCHED = (S.RUNNING, S.CHECKPOINTING, S.RESUMED)


_WATCHED_VALUES = frozenset(s.value for s in WATCHED)
BILLING_CONCURRENCY = 256  # cost appends in flight at once; the journal commits them in groups


def ordered_jobs(table: JobTable) -> list[str]:
    """Jobs to step, higher priority first, first submitted first within a priority.

    Priorities never change after submission, so the sort runs only when jobs were added.
    """
    if len(table.order) != len(table.jobs):
        rows = sorted(table.jobs.values(), key=lambda row: (
            -int(row["priority"] or 0), row["submitted_at"], row["job_id"]))
        table.order = [row["job_id"] for row in rows]
    jobs = table.jobs
    return [
        job_id for job_id in table.order
        if jobs[job_id]["state"] not in TERMINAL_VALUES or table.live_attempts(job_id)
    ]


def jobs_to_step(sup: Supervisor, ordered: list[str], found: InstanceView | None,
                 now: float) -> list[str]:
    """Return the jobs of `ordered` that need a step this tick, in that order.

    A healthy running job with nothing due is skipped at the cost of a few dict lookups, so
    thousands of running jobs cost little more than the few that need a decision. The loop
    reads everything it needs into locals first, because it runs once per job per tick. Jobs
    due only for a periodic bill are held to the tick's share of bills (`_with_bills`).
    """
    if found is None:
        return list(ordered)  # no list this tick: every job decides without one
    jobs, attempts, runtimes = sup.table.jobs, sup.table.attempts, sup.table.runtime
    fresh, known, complete, listed_at = found.fresh, found.known, found.complete, found.listed_at
    cost_s = sup.settings.cost_interval_s
    heartbeat_s = sup.settings.heartbeat_timeout_s
    stall_s = sup.settings.stall_timeout_s
    due = []
    billable: list[tuple[float, str]] = []  # (billed through, job) of jobs due only for a bill
    for job_id in ordered:
        job = jobs[job_id]
        if (job["state"] not in _WATCHED_VALUES or job["cancel_requested"]
                or job["stop_reason"]):
            due.append(job_id)
            continue
        # Exactly one live attempt, the current one, created: anything else needs a decision.
        number = job["attempt"]
        rows = attempts.get(job_id, _NO_ROWS)
        current = rows.get(number)
        if current is None or current["status"] != CREATED or (
            len(rows) > 1 and _other_live(rows, current)
        ):
            due.append(job_id)
            continue
        if (fresh or complete) and (
            (job_id, number) in fresh or (complete and (job_id, number) not in known)
        ):
            due.append(job_id)
            continue
        runtime = runtimes.get(job_id)
        attempt = None if runtime is None else runtime.attempts.get(number)
        if attempt is None or attempt.rate_class is None:
            # Not billed yet: worth a step once some list has shown the instance.
            if (job_id, number) in known:
                due.append(job_id)
            continue
        if now - runtime.last_report_at > heartbeat_s or now - runtime.progress_at > stall_s:
            due.append(job_id)
            continue
        # A bill runs up to the time of this tick's list, so the interval counts to it too.
        billed_through = current["billed_through"] or listed_at
        if listed_at - billed_through >= cost_s:
            billable.append((billed_through, job_id))
    if billable:
        return _with_bills(sup, ordered, due, billable)
    return due


def periodic_bills_per_tick(sup: Supervisor) -> int:
    """Return how many jobs a tick steps only for a periodic bill, at least one."""
    settings = sup.settings
    return max(1, math.ceil(settings.periodic_bills_per_s * settings.tick_s))


def _with_bills(sup: Supervisor, ordered: list[str], due: list[str],
                billable: list[tuple[float, str]]) -> list[str]:
    """Add to `due` the jobs due only for a periodic bill, up to this tick's share of bills.

    Those billed longest ago go first, so with more jobs than the share every job is billed
    in turn, and no tick bills thousands at once.
    """
    limit = periodic_bills_per_tick(sup)
    if len(billable) > limit:
        billable = heapq.nsmallest(limit, billable)
    chosen = set(due)
    chosen.update(job_id for _, job_id in billable)
    return [job_id for job_id in ordered if job_id in chosen]


_NO_ROWS: dict[int, dict[str, Any]] = {}


def _other_live(rows: dict[int, dict[str, Any]], current: dict[str, Any]) -> bool:
    return any(row is not current and row["status"] in LIVE_ATTEMPT_STATUSES
               for row in rows.values())


async def bill_running(sup: Supervisor, due: list[str], found: InstanceView) -> int:
    """Bill the running jobs among `due` concurrently; return how many it looked at.

    With thousands of jobs, many come due for billing in the same tick. Billed one at a time,
    each cost event would be a transaction of its own. Billed together, the journal's group
    commit writes them in a few transactions. `step_job` bills again only what is still due,
    so a job billed here is not billed twice.
    """
    jobs = sup.table.jobs
    running = [job_id for job_id in due
               if jobs[job_id]["state"] in _WATCHED_VALUES and not jobs[job_id]["cancel_requested"]
               and not jobs[job_id]["stop_reason"]]
    if len(running) < 2:
        return 0
    queue = iter(running)

    async def bill_next() -> None:
        # A few workers share one iterator: thousands of waiting tasks would cost more.
        for job_id in queue:
            async with sup.table.runtime_for(job_id).lock:
                instance = found.get((job_id, int(jobs[job_id]["attempt"])))
                await _accrue(sup, job_id, instance, found.listed_at)

    workers = min(BILLING_CONCURRENCY, len(running))
    results = await asyncio.gather(*(bill_next() for _ in range(workers)),
                                   return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return len(running)


async def step_job(sup: Supervisor, job_id: str, found: InstanceView | None,
                   offers_cache: dict[str, deque[RankedOffer]]) -> None:
    job = sup.table.jobs[job_id]
    state = JobState(job["state"])
    instance = None if found is None else found.get((job_id, int(job["attempt"])))
    if found is not None:
        await _accrue(sup, job_id, instance, found.listed_at)
        await _destroy_superseded(sup, job_id)
    if state.is_terminal:
        await _clean_up(sup, job_id, found)
    elif job["cancel_requested"]:
        await _cancel(sup, job_id, found)
    elif job["stop_reason"]:
        await _stop(sup, job_id, instance, found)
    elif state is S.QUEUED:
        await provision.provision(sup, job_id, found, offers_cache)
    elif state is S.PROVISIONING:
        await watch.watch_provisioning(sup, job_id, instance, found)
    elif state in WATCHED:
        await watch.watch_running(sup, job_id, instance, found)
    elif state is S.PREEMPTED:
        await recovery.recover(sup, job_id, instance, found, offers_cache)


async def _accrue(sup: Supervisor, job_id: str, instance: Instance | None,
                  listed_at: float) -> None:
    """Bill live attempts at each change of billing rate, and at least every cost interval.

    Bills run up to the moment a list showed the rate, never beyond it. A change of rate is
    billed at the moment `inst.rate_changed_at` estimates.
    """
    row = sup.table.attempt_row(job_id)
    if row is None or row["status"] not in (CREATED, DESTROY_REQUESTED) or instance is None:
        return
    state = sup.table.runtime_for(job_id).attempt(int(row["attempt"]))
    seen = inst.rate_class(instance)
    state.storage_dph = inst.storage_dph(instance)
    if instance.status_msg != state.status_msg:
        state.status_msg = instance.status_msg
        state.status_changed_at = time.time()
    if state.rate_class is None:
        # First sight since a start: the journal records the rate it billed at until now. An
        # attempt not billed yet was just created, and a new instance bills its GPU at once.
        state.rate_class = row["rate_class"] or "gpu"
    if seen == state.rate_class:
        state.rate_seen_at = listed_at
        if listed_at - (row["billed_through"] or listed_at) >= sup.settings.cost_interval_s:
            # Billed through the list that showed the rate, not beyond what was seen.
            cost = inst.cost_event(sup, job_id, row, listed_at, next_rate=seen)
            if cost is not None:
                await sup.append(job_id, [cost])
        return
    cost = inst.cost_event(sup, job_id, row, _rate_changed_at(sup, job_id, row, state, listed_at),
                           next_rate=seen)
    state.rate_class = seen
    state.rate_seen_at = listed_at
    if cost is not None:
        await sup.append(job_id, [cost])


def _rate_changed_at(sup: Supervisor, job_id: str, row: dict[str, Any], state: AttemptRuntime,
                     listed_at: float) -> float:
    interval_s = float(sup.table.spec(job_id).get("heartbeat_interval_s") or 0.0)
    reported_at = state.reported_at if state.rate_class == "gpu" else None
    return inst.rate_changed_at(
        billed_through=row["billed_through"] or row["created_at"] or listed_at,
        seen_at=state.rate_seen_at, listed_at=listed_at, reported_at=reported_at,
        heartbeat_interval_s=interval_s,
    )


async def _destroy_superseded(sup: Supervisor, job_id: str) -> None:
    """Destroy instances of attempts that are no longer current, and finish started destroys.

    A destroy whose intent is journaled but whose DELETE failed, or never went out before a
    crash, is sent again here, whatever state the job is in.
    """
    current = int(sup.table.jobs[job_id]["attempt"])
    for row in sup.table.live_attempts(job_id):
        if row["status"] == DESTROY_REQUESTED:
            await inst.request_destroy(sup, job_id, row, row["end_reason"] or "destroy resumed")
        elif int(row["attempt"]) != current and row["status"] == CREATED:
            await inst.request_destroy(sup, job_id, row, "superseded by a newer attempt")


async def _clean_up(sup: Supervisor, job_id: str, found: InstanceView | None) -> None:
    for row in sup.table.live_attempts(job_id):
        if row["status"] in (CREATED, DESTROY_REQUESTED) and found is not None:
            await inst.request_destroy(sup, job_id, row, f"job {sup.table.jobs[job_id]['state']}")


async def _cancel(sup: Supervisor, job_id: str, found: InstanceView | None) -> None:
    """Cancel: append the terminal event; cleanup then destroys every instance of the job."""
    job = sup.table.jobs[job_id]
    await sup.append(job_id, [ev.JobCancelled("cancelled by user", int(job["attempt"]))])
    await _clean_up(sup, job_id, found)


async def request_stop(sup: Supervisor, job_id: str, reason: str) -> None:
    """Ask the worker to checkpoint and stop; the job then fails with `reason`.

    The worker gets the request in the response to its next report, or by SIGTERM when the
    instance is destroyed after the grace period, so its last steps are saved first.
    """
    job = sup.table.jobs[job_id]
    if job["stop_reason"] or JobState(job["state"]).is_terminal:
        return
    await sup.append(job_id, [ev.StopRequested(reason, int(job["attempt"]))])


async def _stop(sup: Supervisor, job_id: str, instance: Instance | None,
                found: InstanceView | None) -> None:
    job = sup.table.jobs[job_id]
    runtime = sup.table.runtime_for(job_id)
    row = sup.table.attempt_row(job_id)
    if row is not None and row["status"] in (CREATED, DESTROY_REQUESTED):
        if found is None:
            return
        stopped = runtime.last_report_kind in ("stopping", "checkpoint_saved")
        if instance is not None and instance.actual_status == "running" and not (
            stopped and runtime.last_checkpointing_step is None
        ):
            # The grace counts from the StopRequested event, so it also ends after a restart.
            if not recovery.grace_over(sup.table.spec(job_id), runtime):
                return
        await inst.request_destroy(sup, job_id, row, f"stopped: {job['stop_reason']}")
        return
    if row is not None and row["status"] == REQUESTED:
        return
    await sup.append(job_id, [ev.JobFailed(job["stop_reason"], int(job["attempt"]))])
