"""Per-job decisions on each tick, by state: provision, watch, recover, clean up."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from gpujobs import events as ev
from gpujobs.offers import RankedOffer, outbid_action, rank_offers
from gpujobs.profiles import Profile, offer_query
from gpujobs.projections import (
    CREATE_FAILED, CREATED, DESTROY_REQUESTED, DESTROYED, LIVE_ATTEMPT_STATUSES, REQUESTED,
    WORKER_ERROR,
)
from gpujobs.states import TERMINAL_VALUES, JobState
from gpujobs.supervisor import budget_guard
from gpujobs.supervisor import instances as inst
from gpujobs.supervisor.state import AttemptRuntime, JobTable
from gpujobs.vast import errors as vast_errors
from gpujobs.vast.records import Instance

if TYPE_CHECKING:
    from gpujobs.supervisor.core import Supervisor
    from gpujobs.supervisor.reconcile import InstanceView

log = logging.getLogger(__name__)

S = JobState
WATCHED = (S.RUNNING, S.CHECKPOINTING, S.RESUMED)
LOST_STATUSES = ("exited", "stopped", "offline", "unknown", "frozen")
PREEMPTION_GRACE_MARGIN_S = 5.0


_WATCHED_VALUES = frozenset(s.value for s in WATCHED)


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


def needs_step(sup: Supervisor, job_id: str, found: InstanceView | None, now: float) -> bool:
    """False for a healthy running job with nothing due: the common case, checked cheaply.

    This keeps a tick's cost at a few dict lookups per healthy job, so thousands of running
    jobs cost little more than the few that need a decision.
    """
    job = sup.table.jobs[job_id]
    if (job["state"] not in _WATCHED_VALUES or job["cancel_requested"] or job["stop_reason"]
            or found is None):
        return True
    # Exactly one live attempt, the current one, created: anything else needs a decision.
    number = job["attempt"]
    rows = sup.table.attempts.get(job_id, {})
    current = rows.get(number)
    if current is None or current["status"] != CREATED:
        return True
    if len(rows) > 1 and any(row is not current and row["status"] in LIVE_ATTEMPT_STATUSES
                             for row in rows.values()):
        return True
    key = (job_id, number)
    if key in found.fresh or (found.complete and key not in found.known):
        return True
    runtime = sup.table.runtime.get(job_id)
    attempt = None if runtime is None else runtime.attempts.get(number)
    if attempt is None or attempt.rate_class is None:
        # Not billed yet: worth a step once some list has shown the instance.
        return key in found.known
    settings = sup.settings
    billed_through = current["billed_through"] or now
    return (now - billed_through >= settings.cost_interval_s
            or now - runtime.last_report_at > settings.heartbeat_timeout_s
            or now - runtime.progress_at > settings.stall_timeout_s)


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
        await _provision(sup, job_id, found, offers_cache)
    elif state is S.PROVISIONING:
        await _watch_provisioning(sup, job_id, instance, found)
    elif state in WATCHED:
        await _watch_running(sup, job_id, instance, found)
    elif state is S.PREEMPTED:
        await _recover(sup, job_id, instance, found, offers_cache)


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
    interval_s = float(sup.table.jobs[job_id]["spec"].get("heartbeat_interval_s") or 0.0)
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
    if await sup.append(job_id, [ev.StopRequested(reason, int(job["attempt"]))]):
        sup.table.runtime_for(job_id).preempted_at = time.time()


async def _stop(sup: Supervisor, job_id: str, instance: Instance | None,
                found: InstanceView | None) -> None:
    job = sup.table.jobs[job_id]
    runtime = sup.table.runtime_for(job_id)
    row = sup.table.attempt_row(job_id)
    if row is not None and row["status"] in (CREATED, DESTROY_REQUESTED):
        if found is None:
            return
        report = runtime.last_report
        stopped = report is not None and report.kind.value in ("stopping", "checkpoint_saved")
        if instance is not None and instance.actual_status == "running" and not (
            stopped and report.checkpointing_step is None
        ):
            grace_s = float(job["spec"].get("grace_period_s", 10.0)) + PREEMPTION_GRACE_MARGIN_S
            if time.time() - (runtime.preempted_at or time.time()) < grace_s:
                return
        await inst.request_destroy(sup, job_id, row, f"stopped: {job['stop_reason']}")
        return
    if row is not None and row["status"] == REQUESTED:
        return
    await sup.append(job_id, [ev.JobFailed(job["stop_reason"], int(job["attempt"]))])


async def _ensure_no_live_instance(sup: Supervisor, job_id: str,
                                   found: InstanceView | None) -> bool:
    """Destroy leftovers first: at most one live instance per job, ever."""
    live = sup.table.live_attempts(job_id)
    for row in live:
        if row["status"] == REQUESTED:
            return False  # an intent without an outcome: reconcile must settle it first
        if found is not None:
            await inst.request_destroy(sup, job_id, row, "replaced by a new attempt")
    return not live


async def _provision(sup: Supervisor, job_id: str, found: InstanceView | None,
                     offers_cache: dict[str, deque[RankedOffer]]) -> None:
    runtime = sup.table.runtime_for(job_id)
    if time.time() < runtime.backoff_until:
        if runtime.wait_reason is None:
            runtime.wait_reason = f"backoff after: {sup.table.jobs[job_id]['reason']}"
        return
    if not await _ensure_no_live_instance(sup, job_id, found):
        return
    if await _restarts_spent(sup, job_id):
        return
    await _provision_next(sup, job_id, offers_cache)


async def _restarts_spent(sup: Supervisor, job_id: str) -> bool:
    job = sup.table.jobs[job_id]
    profile = Profile.from_dict(job["profile"])
    if int(job["restarts"]) <= profile.max_restarts:
        return False
    await sup.append(job_id, [ev.JobFailed(
        f"the worker failed {job['restarts']} times (max_restarts {profile.max_restarts}); "
        f"last: {job['reason']}", int(job["attempt"]),
    )])
    return True


async def _provision_next(sup: Supervisor, job_id: str,
                          offers_cache: dict[str, deque[RankedOffer]]) -> None:
    if await budget_guard.admission(sup, job_id) is not None:
        return
    job = sup.table.jobs[job_id]
    runtime = sup.table.runtime_for(job_id)
    profile = Profile.from_dict(job["profile"])
    blocked = sup.limits.blocked(job["team"], sup.live_counts.total, sup.live_counts.by_team)
    if blocked is not None:
        runtime.wait_reason = blocked
        return
    ranked = await _ranked_offers(sup, profile, offers_cache)
    if ranked is None:
        runtime.backoff_until = time.time() + 10.0
        runtime.wait_reason = "offer search failed; retrying"
        return
    choice = _first_free(sup, ranked, _failed_hosts(sup, job_id))
    if choice is None:
        await _no_offer(sup, job_id, profile)
        return
    # Checked last, right before money is spent: a job whose worker finished never reruns.
    marker = await sup.completion_marker(job_id)
    if marker is not None:
        await _complete_from_marker(sup, job_id, marker)
        return
    sup.taken_offer_ids.add(choice.offer.id)
    sup.live_counts.add(job["team"])
    runtime.wait_reason = None
    await inst.create_instance(sup, job_id, choice)


def _first_free(sup: Supervisor, ranked: deque[RankedOffer],
                job_hosts: set[int]) -> RankedOffer | None:
    """Return the best offer not yet taken, on a host that never failed this job.

    Taken offers at the head of the list are dropped from it, so a tick that provisions
    thousands of jobs from one ranking stays linear instead of rescanning them for every job.
    """
    while ranked and ranked[0].offer.id in sup.taken_offer_ids:
        ranked.popleft()
    for choice in ranked:
        if choice.offer.id in sup.taken_offer_ids:
            continue
        if choice.offer.host_id is not None and choice.offer.host_id in job_hosts:
            continue
        return choice
    return None


async def _ranked_offers(sup: Supervisor, profile: Profile,
                         offers_cache: dict[str, deque[RankedOffer]],
                         ) -> deque[RankedOffer] | None:
    """Search and rank once per profile per tick; every job of the profile picks from it."""
    if profile.name in offers_cache:
        return offers_cache[profile.name]
    try:
        offers = await sup.client.search_offers(
            offer_query(profile), order=[("dph_total", "asc")],
            limit=sup.settings.offer_search_limit,
            offer_type="bid" if profile.interruptible else "on-demand",
            allocated_storage_gb=profile.disk_gb,
        )
    except vast_errors.VastError as exc:
        log.warning("offer search for profile %s failed: %s", profile.name, exc)
        return None
    ranked, _ = rank_offers(offers, profile, excluded_hosts=await sup.failed_hosts())
    if not ranked and offers:
        # Hosts that failed other jobs are avoided, not banned: when they are all that is
        # left, a small market must not leave every job of the profile waiting for good.
        ranked, _ = rank_offers(offers, profile)
    offers_cache[profile.name] = deque(ranked)
    return offers_cache[profile.name]


async def _no_offer(sup: Supervisor, job_id: str, profile: Profile) -> None:
    runtime = sup.table.runtime_for(job_id)
    reason = (f"no offer fits profile {profile.name} "
              f"({'/'.join(profile.gpu_names)} x{profile.num_gpus}, <= ${profile.max_dph}/h, "
              f"reliability >= {profile.reliability_min})")
    if runtime.wait_reason != reason:
        log.info("job %s waits: %s", job_id, reason)
    runtime.wait_reason = reason
    runtime.backoff_until = time.time() + min(60.0, max(sup.settings.tick_s * 2, 5.0))
    job = sup.table.jobs[job_id]
    if JobState(job["state"]) is S.PREEMPTED:
        await sup.append(job_id, [ev.RecoveryDeferred(int(job["attempt"]), reason)])


def _failed_hosts(sup: Supervisor, job_id: str) -> set[int]:
    """Hosts that lost or failed to start an attempt of this job (not the job's own errors)."""
    hosts = set()
    for row in sup.table.attempts.get(job_id, {}).values():
        reason = row["end_reason"] or ""
        host_fault = reason.startswith(("preempted:", "instance ", "loading timed out"))
        if host_fault and WORKER_ERROR not in reason and row["host_id"] is not None:
            hosts.add(int(row["host_id"]))
    return hosts


async def _watch_provisioning(sup: Supervisor, job_id: str, instance: Instance | None,
                              found: InstanceView | None) -> None:
    job = sup.table.jobs[job_id]
    row = sup.table.attempt_row(job_id)
    attempt = int(job["attempt"])
    if row is None or row["status"] in (CREATE_FAILED, DESTROYED):
        reason = (row or {}).get("end_reason") or "instance was not created"
        await sup.append(job_id, [ev.ProvisioningFailed(attempt, reason)])
        return
    if row["status"] != CREATED or found is None:
        return
    if instance is None:
        return  # reconcile records it destroyed once the list confirms it is gone
    profile = Profile.from_dict(job["profile"])
    if instance.actual_status in LOST_STATUSES or instance.is_outbid:
        await _lost_before_start(sup, job_id, row, instance)
        return
    # A slow image pull that still changes its status message is progressing: the timeout
    # counts from the last change, not from the create.
    state = sup.table.runtime_for(job_id).attempt(attempt)
    quiet_s = time.time() - max(float(row["created_at"] or 0.0), state.status_changed_at)
    if instance.actual_status != "running" and quiet_s > profile.loading_timeout_s:
        await _lost_before_start(
            sup, job_id, row, instance,
            reason=f"loading timed out: no progress for {quiet_s:.0f} s ({instance.status_msg})",
        )


async def _lost_before_start(sup: Supervisor, job_id: str, row: dict[str, Any],
                             instance: Instance, reason: str | None = None) -> None:
    marker = await sup.completion_marker(job_id)
    if marker is not None:
        await _complete_from_marker(sup, job_id, marker)
        return
    why = reason or f"instance {instance.id} is {instance.actual_status} before the worker started"
    if reason is None and instance.actual_status == "exited":
        # The machine worked; the command did not. That counts against max_restarts.
        why = f"{WORKER_ERROR}: the worker exited before its first report ({instance.status_msg})"
    if await sup.append(job_id, [ev.ProvisioningFailed(int(row["attempt"]), why, 5.0)]):
        sup.table.runtime_for(job_id).backoff_until = time.time() + 5.0
        await inst.request_destroy(sup, job_id, sup.table.attempt_row(job_id, row["attempt"]), why)


async def _watch_running(sup: Supervisor, job_id: str, instance: Instance | None,
                         found: InstanceView | None) -> None:
    job = sup.table.jobs[job_id]
    runtime = sup.table.runtime_for(job_id)
    now = time.time()
    if found is not None and (instance is not None or found.complete):
        lost = _loss_reason(instance)
        if lost is not None:
            await _preemption(sup, job_id, instance, lost)
            return
    silent_s = now - runtime.last_report_at
    timeout_s = sup.settings.heartbeat_timeout_s
    if silent_s > timeout_s + sup.settings.unreachable_grace_s:
        await _preemption(sup, job_id, instance, "heartbeat_lost")
    elif silent_s > timeout_s and not runtime.unreachable_recorded:
        runtime.unreachable_recorded = True
        await sup.append(job_id, [ev.WorkerUnreachable(int(job["attempt"]), silent_s)])
    stalled_s = now - runtime.progress_at
    if stalled_s > sup.settings.stall_timeout_s and not runtime.stalled_recorded:
        runtime.stalled_recorded = True
        await sup.append(job_id, [
            ev.WorkerStalled(int(job["attempt"]), int(job["step"] or 0), stalled_s)
        ])


async def _wait_for_same_host(sup: Supervisor, job_id: str, instance: Instance | None) -> bool:
    """For an outbid instance under a rebid or wait policy: True while it may still come back.

    Vast.ai resumes an outbid instance on the same machine once it regains priority, with its
    disk intact, and a rebid requests that at once. Past resume_wait_s the job migrates.
    """
    job = sup.table.jobs[job_id]
    profile = Profile.from_dict(job["profile"])
    if profile.on_preemption not in ("rebid", "wait") or instance is None:
        return False
    if not (instance.is_outbid or job["reason"] in ("outbid", "sigterm")):
        return False  # lost for another reason (offline, exited): no point waiting
    runtime = sup.table.runtime_for(job_id)
    waited_s = time.time() - (runtime.preempted_at or time.time())
    if waited_s > profile.resume_wait_s:
        log.info("job %s: instance %d did not resume within %.0f s; migrating", job_id,
                 instance.id, profile.resume_wait_s)
        return False
    state = runtime.attempt(int(job["attempt"]))
    if profile.on_preemption == "rebid" and not state.rebid_sent and instance.is_outbid:
        await _rebid(sup, job_id, profile, instance)
        state.rebid_sent = True
    return True


async def _rebid(sup: Supervisor, job_id: str, profile: Profile, instance: Instance) -> None:
    action, price = outbid_action(profile, instance)
    if action != "rebid" or price is None:
        return
    try:
        await sup.client.change_bid(instance.id, price)
    except vast_errors.VastError as exc:
        log.warning("job %s: rebid of instance %d at $%.4f/h failed: %s", job_id, instance.id,
                    price, exc)
        return
    log.info("job %s: outbid; raised the bid on instance %d to $%.4f/h", job_id, instance.id,
             price)


def _loss_reason(instance: Instance | None) -> str | None:
    if instance is None:
        return "gone"
    if instance.is_outbid:
        return "outbid"
    if instance.actual_status in LOST_STATUSES:
        return str(instance.actual_status)
    return None


async def _preemption(sup: Supervisor, job_id: str, instance: Instance | None,
                      reason: str) -> None:
    marker = await sup.completion_marker(job_id)
    if marker is not None:
        await _complete_from_marker(sup, job_id, marker)
        return
    job = sup.table.jobs[job_id]
    if reason == "exited":
        reason = f"{WORKER_ERROR}: the worker exited without completing"
    await sup.append(job_id, [ev.PreemptionDetected(
        int(job["attempt"]), instance.id if instance else job["instance_id"], reason,
        int(job["step"] or 0), job["last_checkpoint_step"],
    )])
    sup.table.runtime_for(job_id).preempted_at = time.time()


async def _recover(sup: Supervisor, job_id: str, instance: Instance | None,
                   found: InstanceView | None,
                   offers_cache: dict[str, deque[RankedOffer]]) -> None:
    job = sup.table.jobs[job_id]
    runtime = sup.table.runtime_for(job_id)
    row = sup.table.attempt_row(job_id)
    if row is not None and row["status"] in (CREATED, DESTROY_REQUESTED):
        if found is None:
            return
        if row["status"] == CREATED and await _wait_for_same_host(sup, job_id, instance):
            return
        if instance is not None and instance.actual_status in ("running", "loading"):
            # The worker may still be writing its emergency checkpoint; let it finish.
            waited_s = time.time() - (runtime.preempted_at or time.time())
            grace_s = float(job["spec"].get("grace_period_s", 10.0)) + PREEMPTION_GRACE_MARGIN_S
            if runtime.preempted_at is None:
                runtime.preempted_at = time.time()
            if waited_s < grace_s:
                return
        await inst.request_destroy(sup, job_id, row, f"preempted: {job['reason']}")
        return
    if row is not None and row["status"] == REQUESTED:
        return
    if await _restarts_spent(sup, job_id):
        return
    if time.time() < runtime.backoff_until:
        return
    await _provision_next(sup, job_id, offers_cache)


async def _complete_from_marker(sup: Supervisor, job_id: str, marker: bytes) -> None:
    from worker.protocol import CompletionMarker

    job = sup.table.jobs[job_id]
    try:
        done = CompletionMarker.from_json(marker)
    except ValueError as exc:
        log.warning("job %s: completion marker is unreadable (%s); not trusting it", job_id, exc)
        return
    log.info("job %s: completion marker found; the job is not run again", job_id)
    await sup.append(job_id, [ev.JobCompleted(int(job["attempt"]), done.step, done.metrics)])
