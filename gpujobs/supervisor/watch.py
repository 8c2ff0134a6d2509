"""Watching live attempts: tell a lost instance, a silent worker and a hung one apart.

Each failure has its own event and policy:

- a lost instance (stopped, exited, offline, outbid or gone): the listed status is confirmed
  with one direct show call, then `PreemptionDetected`. Preemptions never count as restarts.
- an unreachable worker (no report while its instance runs): `WorkerUnreachable` after
  `heartbeat_timeout_s`, and reports that resume before `unreachable_grace_s` more change
  nothing. Past that, `WorkerAbandoned` and a preemption.
- a hung worker (reports keep coming, the step does not move for `stall_timeout_s`):
  `WorkerStalled` and a restart that counts against `max_restarts`.
- a worker that never sends its first report while its instance runs: a failed provisioning
  that counts against `max_restarts`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

from gpujobs import events as ev
from gpujobs.profiles import Profile
from gpujobs.projections import CREATE_FAILED, CREATED, DESTROYED, WORKER_ERROR
from gpujobs.supervisor import instances as inst
from gpujobs.supervisor import provision
from gpujobs.vast import errors as vast_errors
from gpujobs.vast.records import Instance

if TYPE_CHECKING:
    from gpujobs.supervisor.core import Supervisor
    from gpujobs.supervisor.reconcile import InstanceView

log = logging.getLogger(__name__)

LOST_STATUSES = ("exited", "stopped", "offline", "unknown", "frozen")
async def watch_provisioning(sup: Supervisor, job_id: str, instance: Instance | None,
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
    if instance is None and not found.complete:
        return  # no finished sweep has listed it yet
    profile = Profile.from_dict(sup.table.profile(job_id))
    listed = _loss_reason(instance)
    if listed is not None:
        confirmed = await _confirm_loss(sup, job_id, listed, found)
        if confirmed is None or confirmed[0] is None:
            return  # the show call failed, or the instance is gone, which reconcile records
        instance = confirmed[0]
        if confirmed[1] is not None:
            await _lost_before_start(sup, job_id, row, instance)
            return
    if instance.actual_status == "running":
        await _check_first_report(sup, job_id, row, instance)
        return
    # A slow image pull that still changes its status message is progressing: the timeout
    # counts from the last change, not from the create.
    state = sup.table.runtime_for(job_id).attempt(attempt)
    quiet_s = time.time() - max(float(row["created_at"] or 0.0), state.status_changed_at)
    if quiet_s > profile.loading_timeout_s:
        await _lost_before_start(
            sup, job_id, row, instance,
            reason=f"loading timed out: no progress for {quiet_s:.0f} s ({instance.status_msg})",
        )


async def _lost_before_start(sup: Supervisor, job_id: str, row: dict[str, Any],
                             instance: Instance, reason: str | None = None) -> None:
    marker = await sup.completion_marker(job_id)
    if marker is not None:
        await provision.complete_from_marker(sup, job_id, marker)
        return
    why = reason or f"instance {instance.id} is {instance.actual_status} before the worker started"
    if reason is None and instance.actual_status == "exited":
        # The machine worked; the command did not. That counts against max_restarts.
        why = f"{WORKER_ERROR}: the worker exited before its first report ({instance.status_msg})"
    if await sup.append(job_id, [ev.ProvisioningFailed(int(row["attempt"]), why, 5.0)]):
        sup.table.runtime_for(job_id).backoff_until = time.time() + 5.0
        await inst.request_destroy(sup, job_id, sup.table.attempt_row(job_id, row["attempt"]), why)


async def _check_first_report(sup: Supervisor, job_id: str, row: dict[str, Any],
                              instance: Instance) -> None:
    """Give up on a running instance whose worker has not reported within the timeout.

    The wait counts from the first tick that saw the instance running, so after a supervisor
    restart it starts again: a restart can lengthen the wait, never cut it short.
    """
    state = sup.table.runtime_for(job_id).attempt(int(row["attempt"]))
    now = time.time()
    if state.running_since is None:
        state.running_since = now
    timeout_s = sup.settings.first_report_timeout_s
    if state.reported_at is not None or now - state.running_since <= timeout_s:
        return
    log.warning("job %s attempt %s: instance %d runs but its worker sent no report in %.0f s",
                job_id, row["attempt"], instance.id, now - state.running_since)
    await _lost_before_start(
        sup, job_id, row, instance,
        reason=f"{WORKER_ERROR}: no first report within {timeout_s:.0f} s of the instance "
               "running",
    )


async def watch_running(sup: Supervisor, job_id: str, instance: Instance | None,
                        found: InstanceView | None) -> None:
    lost = None
    if found is not None and (instance is not None or found.complete):
        lost = _loss_reason(instance)
    if lost is not None:
        confirmed = await _confirm_loss(sup, job_id, lost, found)
        if confirmed is None:
            return  # the show call failed: decide on a later tick
        instance, lost = confirmed
    if lost is not None:
        await _preemption(sup, job_id, instance, lost)
        return
    if await _check_unreachable(sup, job_id, instance):
        return
    await _check_hung(sup, job_id, instance)


async def _check_unreachable(sup: Supervisor, job_id: str, instance: Instance | None) -> bool:
    """Tolerate silence up to the heartbeat timeout plus the grace; True if the attempt ended."""
    job = sup.table.jobs[job_id]
    runtime = sup.table.runtime_for(job_id)
    silent_s = time.time() - runtime.last_report_at
    timeout_s = sup.settings.heartbeat_timeout_s
    attempt = int(job["attempt"])
    if silent_s > timeout_s + sup.settings.unreachable_grace_s:
        log.warning("job %s attempt %d: no report for %.0f s; giving the attempt up", job_id,
                    attempt, silent_s)
        await _preemption(sup, job_id, instance, "heartbeat_lost",
                          first=[ev.WorkerAbandoned(attempt, silent_s)])
        return True
    if silent_s > timeout_s and not runtime.unreachable_recorded:
        runtime.unreachable_recorded = True
        log.info("job %s attempt %d: no report for %.0f s; waiting up to %.0f s more", job_id,
                 attempt, silent_s, sup.settings.unreachable_grace_s)
        await sup.append(job_id, [ev.WorkerUnreachable(attempt, silent_s)])
    return False


async def _check_hung(sup: Supervisor, job_id: str, instance: Instance | None) -> None:
    """Restart a worker that reports but makes no progress; the restart counts as an error."""
    job = sup.table.jobs[job_id]
    runtime = sup.table.runtime_for(job_id)
    now = time.time()
    stalled_s = now - runtime.progress_at
    if stalled_s <= sup.settings.stall_timeout_s:
        return
    if now - runtime.last_report_at > sup.settings.heartbeat_timeout_s:
        return  # silent, not hung: the unreachable policy decides
    attempt, step = int(job["attempt"]), int(job["step"] or 0)
    log.warning("job %s attempt %d: hung at step %d for %.0f s; restarting it", job_id, attempt,
                step, stalled_s)
    await _preemption(sup, job_id, instance,
                      f"{WORKER_ERROR}: hung at step {step}, no progress for {stalled_s:.0f} s",
                      first=[ev.WorkerStalled(attempt, step, stalled_s)])


async def _confirm_loss(sup: Supervisor, job_id: str, listed_reason: str, found: InstanceView,
                        ) -> tuple[Instance | None, str | None] | None:
    """Re-read an instance that a list showed lost, with one show call, before acting on it.

    A paged list can skip an instance when pages shift under a destroy, and a sweep's status
    can be many ticks old. Returns the fresh instance and its loss reason (None when it is
    healthy after all), or None when the show call failed. Without an instance id to show,
    the journal already records the instance destroyed, so the listed reason is kept.
    """
    job = sup.table.jobs[job_id]
    attempt = int(job["attempt"])
    instance_id = job["instance_id"]
    if instance_id is None:
        return None, listed_reason
    try:
        fresh = await sup.client.show_instance(int(instance_id))
    except vast_errors.VastError as exc:
        log.warning("job %s: show of instance %s failed; deciding later: %s", job_id,
                    instance_id, exc)
        return None
    lost = _loss_reason(fresh)
    if lost is None and fresh is not None:
        log.info("job %s: the list showed instance %d %s, but it is %s; no recovery", job_id,
                 fresh.id, listed_reason, fresh.actual_status)
        found.known[(job_id, attempt)] = dataclasses.replace(fresh, extra_env={}, ports={})
        sup.table.runtime_for(job_id).attempt(attempt).missing_lists = 0
    return fresh, lost


def _loss_reason(instance: Instance | None) -> str | None:
    if instance is None:
        return "gone"
    if instance.is_outbid:
        return "outbid"
    if instance.actual_status in LOST_STATUSES:
        return str(instance.actual_status)
    return None


async def _preemption(sup: Supervisor, job_id: str, instance: Instance | None, reason: str,
                      first: list[ev.JobEvent] | None = None) -> None:
    """Record the loss of the current attempt, after the events in `first`, in one append."""
    marker = await sup.completion_marker(job_id)
    if marker is not None:
        await provision.complete_from_marker(sup, job_id, marker)
        return
    job = sup.table.jobs[job_id]
    if reason == "exited":
        reason = f"{WORKER_ERROR}: the worker exited without completing"
    await sup.append(job_id, [*(first or []), ev.PreemptionDetected(
        int(job["attempt"]), instance.id if instance else job["instance_id"], reason,
        int(job["step"] or 0), job["last_checkpoint_step"],
    )])

