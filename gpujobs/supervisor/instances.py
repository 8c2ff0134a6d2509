"""Side effects on instances, each bracketed by events: intent, action, outcome.

A crash between the intent and the outcome leaves an attempt whose instance may or may not
exist; the reconcile step settles it by label on the next instance list.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from gpujobs import events as ev
from gpujobs.offers import RankedOffer
from gpujobs.profiles import Profile
from gpujobs.projections import CREATED, DESTROY_REQUESTED, label_for
from gpujobs.vast import errors as vast_errors
from gpujobs.vast.records import Instance
from worker import protocol

if TYPE_CHECKING:
    from gpujobs.supervisor.core import Supervisor

log = logging.getLogger(__name__)

# NOTE: the GPU is billed while the machine is reserved for us (cur_state "running", from
# creation through loading and after the container exits) unless the host is offline; storage
# is billed until destroy. The emulator bills this way; `cost-report --reconcile` checks it.


def worker_env(sup: Supervisor, job: dict[str, Any], attempt: int) -> dict[str, str]:
    spec = sup.table.spec(job["job_id"])
    env = {str(k): str(v) for k, v in (spec.get("env") or {}).items()}
    env.update({
        protocol.ENV_JOB_ID: job["job_id"],
        protocol.ENV_ATTEMPT: str(attempt),
        protocol.ENV_ARTIFACT_URI: sup.artifact_uri(job["job_id"]),
        protocol.ENV_JOB_TOKEN: sup.tokens.token_for(job["job_id"]),
        protocol.ENV_TOTAL_STEPS: str(spec["total_steps"]),
        protocol.ENV_CHECKPOINT_EVERY: str(spec["checkpoint_every"]),
        protocol.ENV_KEEP_CHECKPOINTS: str(spec["keep_checkpoints"]),
        protocol.ENV_GRACE_PERIOD_S: str(spec["grace_period_s"]),
        protocol.ENV_STEP_DELAY_S: str(spec["step_delay_s"]),
        protocol.ENV_HEARTBEAT_INTERVAL_S: str(spec["heartbeat_interval_s"]),
        protocol.ENV_SEED: str(spec["seed"]),
        protocol.ENV_NUM_GPUS: str(sup.table.profile(job["job_id"]).get("num_gpus", 1)),
    })
    if sup.settings.report_mode == "mailbox":
        env["GPUJOBS_REPORT_MODE"] = "mailbox"
    else:
        env[protocol.ENV_SUPERVISOR_URL] = sup.report_url
    return env


async def create_instance(sup: Supervisor, job_id: str, choice: RankedOffer) -> None:
    """Record the intent, rent the offer, record the outcome."""
    job = sup.table.jobs[job_id]
    profile = Profile.from_dict(sup.table.profile(job_id))
    attempt = int(job["attempt"]) + 1
    label = label_for(job_id, attempt)
    offer = choice.offer
    selected = ev.OfferSelected(
        attempt=attempt, offer_id=offer.id, machine_id=offer.machine_id, host_id=offer.host_id,
        gpu_name=offer.gpu_name or "", num_gpus=offer.num_gpus or 0,
        dph_total=choice.price_dph or offer.dph_total or 0.0, reliability=offer.reliability,
        bid_price=choice.bid_price, rank_reason=choice.reason,
    )
    await sup.lease.ensure_held()
    if not await sup.append(job_id, [selected, ev.InstanceRequested(attempt, offer.id, label)]):
        return
    spec = sup.table.spec(job_id)
    sent_at = time.time()
    try:
        instance_id = await sup.client.create_instance(
            offer.id, image=spec.get("image") or profile.image,
            env=worker_env(sup, job, attempt), onstart=spec["command"], label=label,
            disk_gb=profile.disk_gb, price=choice.bid_price,
        )
    except vast_errors.BidTooLow as exc:
        await _bid_too_low(sup, job_id, attempt, label, selected.dph_total, sent_at, exc)
        return
    except (vast_errors.OfferUnavailable, vast_errors.InvalidRequest,
            vast_errors.InsufficientCredit, vast_errors.AuthError) as exc:
        # The API rejected the create: nothing exists, so the attempt ends here.
        await sup.append_outcome(job_id, [
            ev.InstanceCreateFailed(attempt, offer.id, type(exc).__name__, str(exc)),
            ev.ProvisioningFailed(attempt, f"create failed: {exc}",
                                  retry_after_s=_retry_delay(exc)),
        ])
        return
    except vast_errors.VastError as exc:
        # The outcome is unknown: the instance may exist. Reconcile adopts it by label,
        # or gives the attempt up once the list has not shown it for a while.
        log.warning("job %s attempt %d: create of offer %d has an unknown outcome: %s",
                    job_id, attempt, offer.id, exc)
        return
    # A cancel appended during the call must not drop this fact: the job's steps then
    # destroy the new instance on the next tick.
    await sup.append_outcome(job_id, [
        ev.InstanceCreated(attempt, instance_id, label, selected.dph_total, billed_from=sent_at),
    ])


def _retry_delay(exc: Exception) -> float:
    if isinstance(exc, vast_errors.OfferUnavailable):
        return 0.0  # another offer may fit right away
    return 30.0


async def _bid_too_low(sup: Supervisor, job_id: str, attempt: int, label: str, dph: float,
                       sent_at: float, exc: vast_errors.BidTooLow) -> None:
    if exc.instance_id is None:
        await sup.append_outcome(job_id, [
            ev.InstanceCreateFailed(attempt, 0, "BidTooLow", str(exc)),
            ev.ProvisioningFailed(attempt, f"bid too low: {exc}", retry_after_s=10.0),
        ])
        return
    # The API created a stopped, billable instance anyway: record it, then destroy it.
    await sup.append_outcome(job_id, [
        ev.InstanceCreated(attempt, exc.instance_id, label, dph, billed_from=sent_at),
    ])
    await sup.append(job_id, [ev.ProvisioningFailed(attempt, f"bid too low: {exc}", 10.0)])


async def request_destroy(sup: Supervisor, job_id: str, attempt_row: dict[str, Any],
                          reason: str) -> None:
    """Ask the API to destroy an attempt's instance; a later list confirms it is gone.

    A DELETE that failed is sent again after a backoff, and one that was accepted is sent
    again if the instance is still listed `sup.destroy_resend_s` later.
    """
    attempt = int(attempt_row["attempt"])
    state = sup.table.runtime_for(job_id).attempt(attempt)
    now = time.time()
    if now < state.destroy_retry_at:
        return
    if state.destroy_sent_at is not None and now - state.destroy_sent_at < sup.destroy_resend_s:
        return
    instance_id = attempt_row["instance_id"]
    earlier_intent = None
    if attempt_row["status"] == DESTROY_REQUESTED:
        if not _still_listed(sup, (job_id, attempt)):
            # An earlier DELETE may have gone through. Only a list that still shows the
            # instance warrants another; a sweep that misses it confirms the destroy.
            return
        earlier_intent = state.destroy_sent_at or attempt_row["destroy_requested_at"]
        reason = attempt_row["end_reason"] or reason  # a retry keeps the first reason
        if state.destroy_sent_at is not None:
            log.warning("job %s attempt %d: instance %s is still listed %.0f s after its DELETE "
                        "was accepted; sending it again", job_id, attempt, instance_id,
                        now - state.destroy_sent_at)
    await sup.lease.ensure_held()
    # Every DELETE, the first and each retry, follows its own intent in the journal. So after a
    # crash the last intent marks the last DELETE that may have gone out.
    if not await sup.append(job_id, [ev.InstanceDestroyRequested(attempt, instance_id, reason)]):
        return
    # The API stops billing when the DELETE arrives, so billing ends when it is sent. The
    # intent's time would be earlier by its commit, which may take a while under load.
    sent_at = time.time()
    try:
        await sup.client.destroy_instance(instance_id)
    except vast_errors.InstanceNotFound:
        # Already gone: an earlier DELETE went through, perhaps before a crash. Billing then
        # ended near that earlier DELETE, not at this one's intent.
        await confirm_destroyed(sup, job_id, attempt, ended_at=earlier_intent)
        return
    except vast_errors.VastError as exc:
        await _destroy_failed(sup, job_id, attempt, instance_id, now, exc)
        return
    state.destroy_sent_at = sent_at


async def _destroy_failed(sup: Supervisor, job_id: str, attempt: int, instance_id: int,
                          now: float, exc: vast_errors.VastError) -> None:
    state = sup.table.runtime_for(job_id).attempt(attempt)
    state.destroy_failures += 1
    delay_s = destroy_backoff_s(state.destroy_failures)
    state.destroy_retry_at = now + delay_s
    log.warning("job %s attempt %d: destroy of instance %s failed (try %d), retrying in %.0f s:"
                " %s", job_id, attempt, instance_id, state.destroy_failures, delay_s, exc)
    if failure_is_reported(state.destroy_failures):
        await sup.append_outcome(job_id, [
            ev.InstanceDestroyFailed(attempt, instance_id, str(exc), delay_s)
        ])


# Failures that are journaled, besides every 50th: a destroy failing for hours must be visible
# in the journal without writing one event per try.
REPORTED_FAILURES = (1, 5, 20)
MAX_DESTROY_BACKOFF_S = 300.0


def destroy_backoff_s(failures: int) -> float:
    """Seconds to wait before the next DELETE after `failures` failed ones in a row."""
    return min(MAX_DESTROY_BACKOFF_S, 2.0 ** failures)


def failure_is_reported(failures: int) -> bool:
    return failures in REPORTED_FAILURES or failures % 50 == 0


def _still_listed(sup: Supervisor, key: tuple[str, int]) -> bool:
    view = sup.view
    return view is not None and (key in view.fresh or key in view.known)


async def confirm_destroyed(sup: Supervisor, job_id: str, attempt: int,
                            ended_at: float | None = None) -> None:
    """Record the destroy (and the last cost) once the API no longer shows the instance.

    `ended_at`, when given, is when billing ended; otherwise it is taken from the DELETE.
    """
    row = sup.table.attempt_row(job_id, attempt)
    if row is None or row["status"] not in (CREATED, DESTROY_REQUESTED):
        return
    runtime = sup.table.runtime_for(job_id)
    state = runtime.attempt(attempt)
    events: list[ev.JobEvent] = []
    # Billing ends when the accepted DELETE was sent, not when a later list confirmed it. After a
    # restart that moment is unknown, so the journaled intent, appended just before, is used.
    end = ended_at or state.destroy_sent_at or row["destroy_requested_at"] or time.time()
    cost = cost_event(sup, job_id, row, end)
    if cost is not None:
        events.append(cost)
    events.append(ev.InstanceDestroyed(attempt, row["instance_id"]))
    if await sup.append_outcome(job_id, events):
        runtime.attempts.pop(attempt, None)
        sup.instances.forget((job_id, attempt))
        sup.settlement.add(job_id, sup.table.attempt_row(job_id, attempt) or {})


def cost_event(sup: Supervisor, job_id: str, row: dict[str, Any], now: float,
               next_rate: str | None = None) -> ev.CostAccrued | None:
    """Bill an attempt from where it was billed through up to now, at the rate last seen."""
    start = row["billed_through"] or row["created_at"]
    if start is None or now <= start:
        return None
    state = sup.table.runtime_for(job_id).attempt(int(row["attempt"]))
    rate = state.rate_class or row["rate_class"]  # memory, or the journal after a restart
    dph = state.storage_dph if rate == "storage" else float(row["dph_total"] or 0.0)
    billed_s = (now - start) * sup.billing_time_scale
    amount = dph * billed_s / 3600.0
    return ev.CostAccrued(int(row["attempt"]), int(row["instance_id"]), amount, billed_s, dph, now,
                          rate_class=next_rate)


def rate_changed_at(*, billed_through: float, seen_at: float | None, listed_at: float,
                    reported_at: float | None, heartbeat_interval_s: float) -> float:
    """Estimate when an instance's billing rate changed, from what bounds that moment.

    The change came after `seen_at`, the last list that showed the old rate, and before
    `listed_at`, the list that shows the new one. While the GPU was held, the worker's reports
    narrow it: the last one (`reported_at`) came before the change, and the next one, due a
    heartbeat interval later, never came. The midpoint of what is left is off by half of it at
    most. The old rate held at `billed_through` too, since bills run only to a moment a list
    showed the rate, or to the creation.
    """
    lower = billed_through if seen_at is None else max(seen_at, billed_through)
    upper = max(lower, listed_at)
    if reported_at is not None:
        lower = max(lower, min(reported_at, upper))
        if heartbeat_interval_s > 0:
            upper = max(lower, min(upper, reported_at + heartbeat_interval_s))
    return max(billed_through, (lower + upper) / 2.0)


def rate_class(instance: Instance) -> str:
    reserved = instance.cur_state == "running" and instance.actual_status != "offline"
    return "gpu" if reserved else "storage"


def storage_dph(instance: Instance) -> float:
    raw = instance.raw
    total = raw.get("storage_total_cost")
    if isinstance(total, (int, float)):
        return float(total)
    per_gb_month = raw.get("storage_cost") or 0.0
    disk_gb = raw.get("disk_space") or 0.0
    try:
        return float(per_gb_month) * float(disk_gb) / 720.0
    except (TypeError, ValueError):
        return 0.0
