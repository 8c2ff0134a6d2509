"""Provisioning: pick the best free offer for a job and rent it, or record why the job waits."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from gpujobs import events as ev
from gpujobs.offers import RankedOffer, rank_offers
from gpujobs.profiles import Profile, offer_query
from gpujobs.projections import REQUESTED, WORKER_ERROR
from gpujobs.states import JobState
from gpujobs.supervisor import budget_guard
from gpujobs.supervisor import instances as inst
from gpujobs.vast import errors as vast_errors

if TYPE_CHECKING:
    from worker.protocol import CompletionMarker

    from gpujobs.supervisor.core import Supervisor
    from gpujobs.supervisor.reconcile import InstanceView

log = logging.getLogger(__name__)

S = JobState


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


async def provision(sup: Supervisor, job_id: str, found: InstanceView | None,
                     offers_cache: dict[str, deque[RankedOffer]]) -> None:
    runtime = sup.table.runtime_for(job_id)
    if time.time() < runtime.backoff_until:
        if runtime.wait_reason is None:
            runtime.wait_reason = f"backoff after: {sup.table.jobs[job_id]['reason']}"
        return
    if not await _ensure_no_live_instance(sup, job_id, found):
        return
    if await restarts_spent(sup, job_id):
        return
    await provision_next(sup, job_id, offers_cache)


async def restarts_spent(sup: Supervisor, job_id: str) -> bool:
    job = sup.table.jobs[job_id]
    profile = Profile.from_dict(sup.table.profile(job_id))
    if int(job["restarts"]) <= profile.max_restarts:
        return False
    await sup.append(job_id, [ev.JobFailed(
        f"the worker failed {job['restarts']} times (max_restarts {profile.max_restarts}); "
        f"last: {job['reason']}", int(job["attempt"]),
    )])
    return True


async def provision_next(sup: Supervisor, job_id: str,
                          offers_cache: dict[str, deque[RankedOffer]]) -> None:
    if await budget_guard.admission(sup, job_id) is not None:
        return
    job = sup.table.jobs[job_id]
    runtime = sup.table.runtime_for(job_id)
    profile = Profile.from_dict(sup.table.profile(job_id))
    blocked = sup.limits.blocked(job["team"], sup.live_counts.total, sup.live_counts.by_team)
    if blocked is not None:
        await _wait(sup, job_id, blocked)
        return
    ranked = await _ranked_offers(sup, profile, offers_cache)
    if ranked is None:
        runtime.backoff_until = time.time() + 10.0
        await _wait(sup, job_id, "offer search failed; retrying")
        return
    choice = _first_free(sup, ranked, _failed_hosts(sup, job_id))
    if choice is None:
        await _no_offer(sup, job_id, profile)
        return
    # Checked last, right before money is spent: a job whose worker finished never reruns.
    marker = await sup.completion_marker(job_id)
    if marker is not None:
        await complete_from_marker(sup, job_id, marker)
        return
    sup.taken_offer_ids.add(choice.offer.id)
    sup.live_counts.add(job["team"])
    runtime.wait_reason = None
    runtime.start_attempt()
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
    runtime.backoff_until = time.time() + min(60.0, max(sup.settings.tick_s * 2, 5.0))
    await _wait(sup, job_id, reason)


async def _wait(sup: Supervisor, job_id: str, reason: str) -> None:
    """Record why the job waits; a preempted job goes back to queued, where status shows it."""
    runtime = sup.table.runtime_for(job_id)
    if runtime.wait_reason != reason:
        log.info("job %s waits: %s", job_id, reason)
    runtime.wait_reason = reason
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



async def complete_from_marker(sup: Supervisor, job_id: str, marker: CompletionMarker) -> None:
    job = sup.table.jobs[job_id]
    log.info("job %s: completion marker found; the job is not run again", job_id)
    await sup.append(job_id, [ev.JobCompleted(int(job["attempt"]), marker.step, marker.metrics)])
