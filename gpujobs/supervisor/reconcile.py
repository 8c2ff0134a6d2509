"""Match the API's instance list to the journal by label, once per tick.

One paged list call per tick, whatever the number of jobs: every per-job decision after it
reads the dict built here. Instances with our label prefix are adopted (an intent without an
outcome), confirmed gone (a destroy that went through), or destroyed (no live attempt owns them).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from gpujobs import events as ev
from gpujobs.projections import CREATED, DESTROY_REQUESTED, REQUESTED, parse_label
from gpujobs.supervisor import instances as inst
from gpujobs.vast import errors as vast_errors
from gpujobs.vast.records import Instance

if TYPE_CHECKING:
    from gpujobs.supervisor.core import Supervisor

log = logging.getLogger(__name__)

InstanceMap = dict[tuple[str, int], Instance]


async def list_instances(sup: Supervisor) -> InstanceMap | None:
    """Return our instances keyed by (job, attempt), or None if the list failed this tick."""
    try:
        listed = await sup.client.list_instances()
    except vast_errors.VastError as exc:
        log.warning("instance list failed; skipping reconcile this tick: %s", exc)
        return None
    found: InstanceMap = {}
    for instance in listed:
        key = parse_label(instance.label)
        if key is not None:
            found[key] = instance
    return found


async def reconcile(sup: Supervisor, found: InstanceMap) -> None:
    table = sup.table
    for (job_id, attempt), instance in found.items():
        job = table.jobs.get(job_id)
        if job is None:
            await _destroy_unknown(sup, job_id, attempt, instance)
            continue
        row = table.attempt_row(job_id, attempt)
        if row is None:
            await _destroy_unknown(sup, job_id, attempt, instance)
            continue
        if row["status"] == REQUESTED:
            async with table.runtime_for(job_id).lock:
                await _adopt(sup, job_id, attempt, instance)
        elif row["status"] not in (CREATED, DESTROY_REQUESTED):
            # The journal gave this attempt up, but the machine exists: own it, then destroy it.
            async with table.runtime_for(job_id).lock:
                await _adopt(sup, job_id, attempt, instance)
    await _settle_missing(sup, found)


async def _adopt(sup: Supervisor, job_id: str, attempt: int, instance: Instance) -> None:
    log.info("job %s attempt %d: adopting instance %d found by label", job_id, attempt,
             instance.id)
    await sup.append(job_id, [
        ev.InstanceCreated(attempt, instance.id, instance.label or "",
                           float(instance.dph_total or 0.0), adopted=True)
    ])


async def _destroy_unknown(sup: Supervisor, job_id: str, attempt: int, instance: Instance) -> None:
    # NOTE: a label with our prefix but no job in this journal is taken as a leak of ours, so
    # two journals must not share one Vast.ai account.
    log.warning("instance %d has label %r but no such attempt in the journal; destroying it",
                instance.id, instance.label)
    try:
        await sup.client.destroy_instance(instance.id)
    except vast_errors.InstanceNotFound:
        pass
    except vast_errors.VastError as exc:
        log.warning("destroy of unknown instance %d failed; will retry: %s", instance.id, exc)


async def _settle_missing(sup: Supervisor, found: InstanceMap) -> None:
    """Attempts the journal thinks are alive but the list no longer shows."""
    table = sup.table
    now = time.time()
    for job_id in list(table.jobs):
        for row in table.live_attempts(job_id):
            key = (job_id, int(row["attempt"]))
            if key in found:
                table.runtime_for(job_id).missing_lists = 0
                continue
            async with table.runtime_for(job_id).lock:
                await _settle_one(sup, job_id, row, now)


async def _settle_one(sup: Supervisor, job_id: str, row: dict, now: float) -> None:
    attempt = int(row["attempt"])
    if row["status"] == REQUESTED:
        requested_at = row["requested_at"] or now
        if now - requested_at < sup.intent_timeout_s:
            return  # the create may still be in flight or not yet listed
        await sup.append(job_id, [
            ev.InstanceCreateFailed(attempt, int(row["offer_id"] or 0), "NotListed",
                                    "no instance with this attempt's label appeared"),
        ])
        return
    # Created or being destroyed, and no longer listed. One missing listing is enough after a
    # DELETE went through; otherwise wait for a second one, in case a page shifted under us.
    runtime = sup.table.runtime_for(job_id)
    runtime.missing_lists += 1
    if runtime.destroy_sent_at is None and runtime.missing_lists < 2:
        return
    await inst.confirm_destroyed(sup, job_id, attempt, None)
