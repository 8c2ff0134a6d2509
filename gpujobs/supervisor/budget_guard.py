"""Budget admission before provisioning, and enforcement of budgets and max duration each tick.

The guard keeps its own fold of the journal's cost events (one query per tick for the events
appended since the last one), so each tick costs O(jobs) and no API call. Spend counts the
journal's CostAccrued amounts plus an estimate of what live instances have run up since they
were last billed: dph x time since billed_through x the billing time scale.

Admission reserves money: a job is admitted only when its worst case fits what is left after
the remaining worst case reserved by every job that holds an instance or was admitted
earlier in the same tick, so that several queued jobs never each count on the same dollars.

Enforcement stops a scope's jobs before the limit: once the spend, plus what the scope's live
instances burn during one stop (the grace period to checkpoint, the destroy, two ticks), would
reach it. What still goes over the limit is the error of that estimate, at most about one tick
of billing.
"""

from __future__ import annotations

import heapq
import json
import logging
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpujobs import events as ev
from gpujobs.budgets import BudgetBook, BudgetConfig, BudgetStatus, load_budgets
from gpujobs.cost import RUN_ENDS
from gpujobs.errors import ConfigError
from gpujobs.profiles import environment_from
from gpujobs.projections import CREATED, DESTROY_REQUESTED, billing_start
from gpujobs.states import TERMINAL_VALUES, JobState

if TYPE_CHECKING:
    from gpujobs.supervisor.core import Supervisor

log = logging.getLogger(__name__)

STOP_MARGIN_S = 5.0  # what the supervisor waits past a job's grace period before destroying
GUARD_EVENT_TYPES = ("JobSubmitted", "InstanceRequested", "InstanceCreated", "CostAccrued",
                     "WorkerStarted", "JobResumed", "BudgetAlert", *RUN_ENDS)
_GUARDS: weakref.WeakKeyDictionary[Any, BudgetGuard] = weakref.WeakKeyDictionary()


@dataclass
class JobFacts:
    team: str
    project: str
    max_dph: float
    max_duration_hours: float
    run_closed_s: float = 0.0  # real seconds the worker ran on finished attempts
    run_since: float | None = None  # when the current attempt's worker started
    run_attempt: int = 0
    last_cost_seq: int = 0
    budgeted_by: int = 0  # the budget config generation that `budgeted` was computed for
    budgeted: bool = False

    def running_s(self, now: float) -> float:
        open_s = now - self.run_since if self.run_since is not None else 0.0
        return self.run_closed_s + max(0.0, open_s)


@dataclass
class Reservations:
    """Remaining worst cases of jobs that hold an instance or were admitted, by team/project."""

    tick: int = -1
    by_job: dict[str, tuple[str, str, float]] = field(default_factory=dict)
    by_scope: dict[tuple[str, str], float] = field(default_factory=dict)
    admitted: list[tuple[str, JobFacts, float]] = field(default_factory=list)

    def add(self, job_id: str, facts: JobFacts, usd: float) -> None:
        key = (facts.team, facts.project)
        self.by_job[job_id] = (facts.team, facts.project, usd)
        self.by_scope[key] = self.by_scope.get(key, 0.0) + usd

    def reserved_usd(self, status: BudgetStatus, job_id: str) -> float:
        """Return the money reserved in the status's scope by jobs other than `job_id`."""
        total = sum(usd for (team, project), usd in self.by_scope.items()
                    if status.budget.applies_to(team, project))
        own = self.by_job.get(job_id)
        if own is not None and status.budget.applies_to(own[0], own[1]):
            total -= own[2]
        return total


@dataclass
class BudgetGuard:
    config: BudgetConfig
    files: tuple[tuple[Path, float], ...]
    env: str | None
    book: BudgetBook = field(default_factory=BudgetBook)
    jobs: dict[str, JobFacts] = field(default_factory=dict)
    # Where the folded CostAccrued events end, per (job, attempt): live spend is estimated
    # from here, so that it never overlaps the amounts already in the book.
    billed_through: dict[tuple[str, int], float] = field(default_factory=dict)
    requested_at: dict[tuple[str, int], float] = field(default_factory=dict)
    alerted: set[tuple[str, float]] = field(default_factory=set)
    seq: int = 0
    synced_tick: int = -1
    unbilled_cache: tuple[float, list[tuple[str, str, float]]] | None = None
    budgeted: dict[tuple[int, str, str], bool] = field(default_factory=dict)
    generation: int = 1  # counts the loads of the budget config
    # The tick, its live_rows, and the keys in it that _budgeted_live yields.
    live_cache: tuple[int, dict, list[tuple[str, int]]] | None = None
    reservations: Reservations = field(default_factory=Reservations)
    # Max-duration checks: jobs whose run facts changed since the last enforcement, and a heap
    # of (when the job reaches its max duration, job id), so that a tick looks only at jobs due.
    duration_changed: set[str] = field(default_factory=set)
    duration_due: list[tuple[float, str]] = field(default_factory=list)

    def fold(self, seq: int, stream: str, kind: str, data: dict[str, Any], at: float) -> None:
        if kind == "JobSubmitted":
            profile = data.get("profile") or {}
            self.jobs[stream] = JobFacts(
                str(data["team"]), str(data["project"]), float(profile.get("max_dph", 0.0)),
                float(profile.get("max_duration_hours", 0.0)),
            )
            return
        if kind == "BudgetAlert":
            self.alerted.add((str(data["scope"]), float(data["threshold"])))
            return
        facts = self.jobs.get(stream)
        if facts is None:
            return
        attempt = int(data.get("attempt") or 0)
        if kind == "InstanceRequested":
            self.requested_at[(stream, attempt)] = at
        elif kind == "InstanceCreated":
            # Billing starts where the cost projection starts it.
            requested_at = self.requested_at.pop((stream, attempt), None)
            self.billed_through[(stream, attempt)] = billing_start(requested_at, data, at)
        elif kind == "CostAccrued":
            start = self.billed_through.get((stream, attempt), float(data["through"]))
            self.book.add(facts.team, facts.project, start, float(data["through"]),
                          float(data["amount_usd"]))
            self.billed_through[(stream, attempt)] = float(data["through"])
            facts.last_cost_seq = seq
        elif kind in ("WorkerStarted", "JobResumed") and facts.run_since is None:
            facts.run_since, facts.run_attempt = at, attempt
            self.duration_changed.add(stream)
        if kind in RUN_ENDS and facts.run_since is not None and attempt in (
            facts.run_attempt, 0
        ):
            facts.run_closed_s += max(0.0, at - facts.run_since)
            facts.run_since = None
            self.duration_changed.add(stream)


def _budget_paths(sup: Supervisor) -> list[Path]:
    return list(sup.settings.budget_files())


def _stamp(paths: list[Path]) -> tuple[tuple[Path, float], ...]:
    return tuple((path, path.stat().st_mtime) for path in paths if path.exists())


def _env(sup: Supervisor) -> str | None:
    return getattr(sup.settings, "env", None) or environment_from(None)


def guard_for(sup: Supervisor) -> BudgetGuard:
    """Return this supervisor's guard, loading budgets.yaml on the first call.

    Raises ConfigError when budgets.yaml is invalid.
    """
    guard = _GUARDS.get(sup)
    if guard is None:
        paths = _budget_paths(sup)
        env = _env(sup)
        guard = BudgetGuard(load_budgets(paths, env=env), _stamp(paths), env)
        _GUARDS[sup] = guard
        log.info("budgets: %d in effect (environment %s, on_exceeded %s)",
                 len(guard.config.budgets), env or "none", guard.config.on_exceeded)
    return guard


def _reload_if_changed(guard: BudgetGuard, sup: Supervisor) -> None:
    paths = _budget_paths(sup)
    stamp = _stamp(paths)
    if stamp == guard.files:
        return
    guard.files = stamp
    try:
        guard.config = load_budgets(paths, env=guard.env)
        guard.generation += 1
        guard.live_cache = None
    except ConfigError as exc:
        log.error("budgets.yaml changed but is invalid, keeping the budgets in effect: %s", exc)
        return
    log.info("budgets reloaded: %d in effect", len(guard.config.budgets))


async def sync(sup: Supervisor) -> BudgetGuard:
    """Fold the cost events appended since the last call; at most one query per tick."""
    guard = guard_for(sup)
    if guard.synced_tick == sup.ticks:
        return guard
    _reload_if_changed(guard, sup)
    placeholders = ", ".join("?" for _ in GUARD_EVENT_TYPES)
    rows = await sup.store.query(
        f"SELECT seq, stream, type, data, recorded_at FROM events WHERE seq > ? AND type IN "
        f"({placeholders}) ORDER BY seq", (guard.seq, *GUARD_EVENT_TYPES),
    )
    for row in rows:
        guard.fold(int(row[0]), row[1], row[2], json.loads(row[3]), float(row[4]))
        guard.seq = int(row[0])
    guard.synced_tick = sup.ticks
    guard.unbilled_cache = None
    return guard


def _live_attempts(sup: Supervisor) -> Iterator[tuple[tuple[str, int], dict[str, Any]]]:
    """Yield (job id, attempt) and row of each attempt with a live instance this tick."""
    for key, row in sup.live_rows.items():
        if row["status"] in (CREATED, DESTROY_REQUESTED) and row["instance_id"] is not None:
            yield key, row


def _live_dph(sup: Supervisor, job_id: str, row: dict[str, Any]) -> float:
    """Return the rate the attempt bills at now: storage while stopped, else its dph_total."""
    billing = sup.table.runtime_for(job_id).attempts.get(int(row["attempt"]))
    if billing is not None and billing.rate_class == "storage":
        return billing.storage_dph
    return float(row["dph_total"] or 0.0)


def _budgeted_live(sup: Supervisor,
                   guard: BudgetGuard) -> Iterator[tuple[str, dict[str, Any], JobFacts]]:
    """Yield (job, attempt row, facts) of live instances that a budget covers.

    The tick's first call finds them; it keeps only their (job id, attempt) keys, the tuples
    `live_rows` already holds. A cached list of new tuples, one per instance, would outlive
    the collector's young generations every tick and bring on full collections sooner.
    """
    rows = sup.live_rows
    cache = guard.live_cache
    if cache is None or cache[0] != sup.ticks or cache[1] is not rows:
        keys = []
        for key, _ in (_live_attempts(sup) if guard.config.budgets else ()):
            facts = guard.jobs.get(key[0])
            if facts is not None and _budgeted(guard, facts):
                keys.append(key)
        cache = guard.live_cache = (sup.ticks, rows, keys)
    for key in cache[2]:
        facts = guard.jobs.get(key[0])
        if facts is not None:
            yield key[0], rows[key], facts


def unbilled(sup: Supervisor, guard: BudgetGuard, now: float) -> list[tuple[str, str, float]]:
    """(team, project, usd) that live instances ran up since they were last billed.

    Computed once per tick (per sync), so admitting many queued jobs stays O(jobs).
    """
    if guard.unbilled_cache is not None:
        return guard.unbilled_cache[1]
    pending = []
    for job_id, row, facts in _budgeted_live(sup, guard):
        # The guard's own mark, not the row's: the row may include a CostAccrued that the
        # book has not folded yet (or the reverse), which would count an interval twice.
        since = guard.billed_through.get((job_id, int(row["attempt"])))
        if since is None:
            continue
        usd = _live_dph(sup, job_id, row) * max(0.0, now - since) * sup.billing_time_scale / 3600
        pending.append((facts.team, facts.project, usd))
    guard.unbilled_cache = (now, pending)
    return pending


def _statuses(sup: Supervisor, guard: BudgetGuard, team: str, project: str,
              now: float) -> list[BudgetStatus]:
    live = unbilled(sup, guard, now)
    return [guard.book.spent(b, now, live) for b in guard.config.for_job(team, project)]


def remaining_hours(sup: Supervisor, facts: JobFacts, now: float) -> float:
    """Billed hours the job may still run under its max_duration_hours."""
    ran_h = facts.running_s(now) * sup.billing_time_scale / 3600.0
    return max(0.0, facts.max_duration_hours - ran_h)


async def admission(sup: Supervisor, job_id: str) -> str | None:
    """Check that the job's worst case fits every budget it is in; None when it may provision.

    When it does not fit, the job waits, or fails at once under ``on_exceeded: reject``. A
    preempted job that waits gets RecoveryDeferred, so it shows as queued with the reason.
    Either way the reason is returned, and the caller must not provision.
    """
    guard = await sync(sup)
    facts = guard.jobs.get(job_id)
    if facts is None:
        return None
    now = time.time()
    hours = remaining_hours(sup, facts, now)
    worst_usd = facts.max_dph * hours
    reservations = _current_reservations(sup, guard, now)
    for status in _statuses(sup, guard, facts.team, facts.project, now):
        reserved_usd = reservations.reserved_usd(status, job_id)
        if worst_usd > status.left_usd - reserved_usd:
            reason = (f"budget {status.scope} has ${max(0.0, status.left_usd - reserved_usd):.2f} "
                      f"of ${status.limit_usd:.2f} left"
                      + (f" after ${reserved_usd:.2f} reserved for admitted jobs" if reserved_usd else "")
                      + f", but the job may cost up to ${worst_usd:.2f} "
                      f"(max_dph ${facts.max_dph:g}/h x {hours:g} h)")
            await _hold(sup, guard, job_id, reason)
            return reason
    if _budgeted(guard, facts):
        reservations.admitted.append((job_id, facts, worst_usd))
    return None


BILLING_STATES = frozenset({JobState.PROVISIONING.value, JobState.RUNNING.value,
                            JobState.CHECKPOINTING.value, JobState.RESUMED.value})


def _may_bill(sup: Supervisor, job_id: str) -> bool:
    """Return whether the job may still bill: it passed admission and has not ended.

    A preempted job keeps its reservation only while its instance lives (waiting for the
    same host); without one it must pass admission again.
    """
    job = sup.table.jobs.get(job_id)
    if job is None:
        return False
    state = job["state"]
    if state in BILLING_STATES:
        return True
    return state == JobState.PREEMPTED.value and bool(sup.table.live_attempts(job_id))


def _current_reservations(sup: Supervisor, guard: BudgetGuard,
                          now: float) -> Reservations:
    """Return this tick's reservations: rebuilt from job states once, then grown by admissions.

    A job admitted earlier in the tick counts once its provisioning left it out of queued; a
    job admitted but then left waiting (no offer, instance limit) reserves nothing.
    """
    reservations = guard.reservations
    if reservations.tick != sup.ticks:
        reservations = guard.reservations = Reservations(tick=sup.ticks)
        for job_id in sup.table.jobs:
            facts = guard.jobs.get(job_id)
            if facts is not None and _budgeted(guard, facts) and _may_bill(sup, job_id):
                reservations.add(job_id, facts, facts.max_dph * remaining_hours(sup, facts, now))
        return reservations
    for job_id, facts, worst_usd in reservations.admitted:
        if job_id not in reservations.by_job and _may_bill(sup, job_id):
            reservations.add(job_id, facts, worst_usd)
    reservations.admitted.clear()
    return reservations


async def _hold(sup: Supervisor, guard: BudgetGuard, job_id: str, reason: str) -> None:
    job = sup.table.jobs[job_id]
    runtime = sup.table.runtime_for(job_id)
    attempt = int(job["attempt"])
    if guard.config.on_exceeded == "reject":
        log.warning("job %s rejected: %s", job_id, reason)
        await sup.append(job_id, [ev.JobFailed(f"rejected: {reason}", attempt)])
        return
    if runtime.wait_reason != reason:
        log.info("job %s waits: %s", job_id, reason)
    runtime.wait_reason = reason
    if JobState(job["state"]) is JobState.PREEMPTED:
        await sup.append(job_id, [ev.RecoveryDeferred(attempt, reason)])


async def enforce(sup: Supervisor) -> None:
    """Record alerts, then stop jobs past max_duration_hours or in a scope at its limit."""
    guard = await sync(sup)
    now = time.time()
    live = unbilled(sup, guard, now)
    statuses = [guard.book.spent(b, now, live) for b in guard.config.budgets]
    for status in statuses:
        await _alert(sup, guard, status)
    for job_id, reason in _stops(sup, guard, statuses, now):
        log.warning("job %s: stopping: %s", job_id, reason)
        await sup.stop_job(job_id, reason)


def _stoppable(job: dict[str, Any]) -> bool:
    return (job["state"] not in TERMINAL_VALUES and not job["stop_reason"]
            and not job["cancel_requested"])


def _stops(sup: Supervisor, guard: BudgetGuard, statuses: list[BudgetStatus],
           now: float) -> list[tuple[str, str]]:
    stops = dict(_over_max_duration(sup, guard, now))
    running = _running_in_scope(sup, guard)
    for status in statuses:
        in_scope = [(j, dph) for j, team, project, dph in running
                    if status.budget.applies_to(team, project)]
        if not in_scope:
            continue
        burn_usd = sum(dph for _, dph in in_scope) * _stop_lead_s(sup, [j for j, _ in in_scope]
                                                                  ) * sup.billing_time_scale / 3600
        if status.spent_usd + burn_usd >= status.limit_usd:
            reason = (f"budget {status.scope} is used up: ${status.spent_usd:.2f} spent of "
                      f"${status.limit_usd:.2f}, and stopping may cost ${burn_usd:.2f} more")
            for job_id, _ in in_scope:
                stops.setdefault(job_id, reason)
    return list(stops.items())


def _over_max_duration(sup: Supervisor, guard: BudgetGuard, now: float) -> list[tuple[str, str]]:
    """(job, reason) for stoppable jobs that ran their max_duration_hours.

    Each job whose run started or ended since the last call goes on a heap under the moment it
    reaches its limit. A tick then checks only the jobs whose moment has come, against their
    current facts, so thousands of running jobs cost nothing until one is due.
    """
    scale_h = sup.billing_time_scale / 3600.0
    for job_id in guard.duration_changed:
        facts = guard.jobs.get(job_id)
        if facts is not None and facts.max_duration_hours > 0:
            _push_deadline(guard, job_id, facts, scale_h, now)
    guard.duration_changed.clear()
    over: list[tuple[str, str]] = []
    checked: set[str] = set()  # a job can be on the heap twice: one check settles it
    while guard.duration_due and guard.duration_due[0][0] <= now:
        _, job_id = heapq.heappop(guard.duration_due)
        facts, job = guard.jobs.get(job_id), sup.table.jobs.get(job_id)
        if job_id in checked or facts is None or job is None or not _stoppable(job):
            continue  # ended, or already stopping, so it never needs this check again
        checked.add(job_id)
        ran_h = facts.running_s(now) * scale_h
        if ran_h >= facts.max_duration_hours:
            over.append((job_id, f"max_duration_hours reached: ran {ran_h:.2f} h of "
                                 f"{facts.max_duration_hours:g} h"))
            # Checked again next tick, in case the stop request did not get recorded.
            heapq.heappush(guard.duration_due, (now + sup.settings.tick_s, job_id))
        elif facts.run_since is not None:
            # An entry of an earlier run, or rounding: wait for the current run's moment.
            _push_deadline(guard, job_id, facts, scale_h, now + sup.settings.tick_s)
    return over


def _push_deadline(guard: BudgetGuard, job_id: str, facts: JobFacts, scale_h: float,
                   earliest: float) -> None:
    """Put the job on the heap at the moment it reaches its limit, but not before `earliest`."""
    limit_s = facts.max_duration_hours / scale_h
    if facts.run_since is not None:
        deadline = facts.run_since + limit_s - facts.run_closed_s
        heapq.heappush(guard.duration_due, (max(deadline, earliest), job_id))
    elif facts.run_closed_s >= limit_s:
        heapq.heappush(guard.duration_due, (earliest, job_id))  # over when its last run ended


def _running_in_scope(sup: Supervisor, guard: BudgetGuard) -> list[tuple[str, str, str, float]]:
    """(job, team, project, dph) of every stoppable job with a live instance."""
    jobs = sup.table.jobs
    return [(job_id, facts.team, facts.project, _live_dph(sup, job_id, row))
            for job_id, row, facts in _budgeted_live(sup, guard)
            if job_id in jobs and _stoppable(jobs[job_id])]


def _budgeted(guard: BudgetGuard, facts: JobFacts) -> bool:
    """Return whether any budget covers the job's team and project."""
    if facts.budgeted_by != guard.generation:
        key = (guard.generation, facts.team, facts.project)
        if key not in guard.budgeted:
            guard.budgeted[key] = bool(guard.config.for_job(facts.team, facts.project))
        facts.budgeted, facts.budgeted_by = guard.budgeted[key], guard.generation
    return facts.budgeted


def _stop_lead_s(sup: Supervisor, job_ids: list[str]) -> float:
    """Real seconds from a stop request until billing ends: grace, margin and two ticks."""
    grace_s = max(float(sup.table.spec(j).get("grace_period_s", 10.0)) for j in job_ids)
    return grace_s + STOP_MARGIN_S + 2 * sup.settings.tick_s


async def _alert(sup: Supervisor, guard: BudgetGuard, status: BudgetStatus) -> None:
    for threshold in status.budget.alert_at:
        key = (status.scope, threshold)
        if status.fraction < threshold or key in guard.alerted:
            continue
        job_id = _job_to_alert(sup, guard, status)
        if job_id is None:
            return
        log.warning("budget %s crossed %.0f%%: $%.2f spent of $%.2f (recorded on job %s)",
                    status.scope, threshold * 100, status.spent_usd, status.limit_usd, job_id)
        alert = ev.BudgetAlert(status.scope, threshold, round(status.spent_usd, 6),
                               status.limit_usd)
        if await sup.append(job_id, [alert]):
            guard.alerted.add(key)


def _job_to_alert(sup: Supervisor, guard: BudgetGuard, status: BudgetStatus) -> str | None:
    """Pick the job in the scope that was billed last, among the supervisor's jobs."""
    best: tuple[int, str] | None = None
    for job_id in sup.table.jobs:
        facts = guard.jobs.get(job_id)
        if facts is None or not status.budget.applies_to(facts.team, facts.project):
            continue
        if best is None or facts.last_cost_seq > best[0]:
            best = (facts.last_cost_seq, job_id)
    return None if best is None else best[1]
