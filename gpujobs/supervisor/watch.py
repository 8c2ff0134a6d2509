"""Watching live attempts: tell a lost instance, a silent worker and a hung one apart."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from gpujobs import events as ev
from gpujobs.profiles import Profile
from gpujobs.projections import CREATE_FAILED, CREATED, DESTROYED, WORKER_ERROR
from gpujobs.supervisor import instances as inst
from gpujobs.supervisor import provision
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
        await provision.complete_from_marker(sup, job_id, marker)
        return
    why = reason or f"instance {instance.id} is {instance.actual_status} before the worker started"
    if reason is None and instance.actual_status == "exited":
        # The machine worked; the command did not. That counts against max_restarts.
        why = f"{WORKER_ERROR}: the worker exited before its first report ({instance.status_msg})"
    if await sup.append(job_id, [ev.ProvisioningFailed(int(row["attempt"]), why, 5.0)]):
        sup.table.runtime_for(job_id).backoff_until = time.time() + 5.0
        await inst.request_destroy(sup, job_id, sup.table.attempt_row(job_id, row["attempt"]), why)


async def watch_running(sup: Supervisor, job_id: str, instance: Instance | None,
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
        await provision.complete_from_marker(sup, job_id, marker)
        return
    job = sup.table.jobs[job_id]
    if reason == "exited":
        reason = f"{WORKER_ERROR}: the worker exited without completing"
    await sup.append(job_id, [ev.PreemptionDetected(
        int(job["attempt"]), instance.id if instance else job["instance_id"], reason,
        int(job["step"] or 0), job["last_checkpoint_step"],
    )])
    sup.table.runtime_for(job_id).preempted_at = time.time()

