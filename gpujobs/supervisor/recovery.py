"""Recovery of a preempted job: wait for the same host, or destroy and provision anew."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from gpujobs.offers import RankedOffer, outbid_action
from gpujobs.profiles import Profile
from gpujobs.projections import CREATED, DESTROY_REQUESTED, REQUESTED
from gpujobs.supervisor import instances as inst
from gpujobs.supervisor import provision
from gpujobs.supervisor.state import JobRuntime
from gpujobs.vast import errors as vast_errors
from gpujobs.vast.records import Instance

if TYPE_CHECKING:
    from gpujobs.supervisor.core import Supervisor
    from gpujobs.supervisor.reconcile import InstanceView

log = logging.getLogger(__name__)

PREEMPTION_GRACE_MARGIN_S = 5.0


def waited_s(runtime: JobRuntime) -> float:
    """Seconds since the job's current wait began; a wait with no known start begins now."""
    now = time.time()
    if runtime.preempted_at is None:
        runtime.preempted_at = now
    return now - runtime.preempted_at


def grace_over(spec: dict[str, Any], runtime: JobRuntime) -> bool:
    """True once the worker has had its grace period, and a margin, for a last checkpoint."""
    grace_s = float(spec.get("grace_period_s", 10.0)) + PREEMPTION_GRACE_MARGIN_S
    return waited_s(runtime) >= grace_s


async def _wait_for_same_host(sup: Supervisor, job_id: str, instance: Instance | None) -> bool:
    """For an outbid instance under a rebid or wait policy: True while it may still come back.

    Vast.ai resumes an outbid instance on the same machine once it regains priority, with its
    disk intact, and a rebid requests that at once. Past resume_wait_s the job migrates.
    """
    job = sup.table.jobs[job_id]
    profile = Profile.from_dict(sup.table.profile(job_id))
    if profile.on_preemption not in ("rebid", "wait") or instance is None:
        return False
    if not (instance.is_outbid or job["reason"] in ("outbid", "sigterm")):
        return False  # lost for another reason (offline, exited): no point waiting
    runtime = sup.table.runtime_for(job_id)
    if waited_s(runtime) > profile.resume_wait_s:
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


async def recover(sup: Supervisor, job_id: str, instance: Instance | None,
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
            if not grace_over(sup.table.spec(job_id), runtime):
                return
        await inst.request_destroy(sup, job_id, row, f"preempted: {job['reason']}")
        return
    if row is not None and row["status"] == REQUESTED:
        return
    if await provision.restarts_spent(sup, job_id):
        return
    if time.time() < runtime.backoff_until:
        return
    await provision.provision_next(sup, job_id, offers_cache)

