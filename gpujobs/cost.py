"""Cost per attempt and per job from the journal, split into useful work and waste.

Every `CostAccrued` event bills one attempt from where it was billed through up to `through`,
at one rate: the instance's dph_total while the GPU was held, the storage rate while it was
stopped. Each such segment is cut at the attempt's phase boundaries (real time, billed evenly
inside a segment) into pieces of one category:

- provisioning: from the instance's creation until the worker started (WorkerStarted or
  JobResumed), or the whole attempt if the worker never started;
- lost: at a preemption, from the moment the last durable checkpoint's step was reached
  until the loss. An attempt that saved no checkpoint loses its whole run. A stop or cancel
  that the user or a budget requested loses nothing;
- idle: after the worker stopped (loss, completion, failure, cancel, destroy request, or the
  checkpoint it saved after a stop or cancel request) until the instance was destroyed, and
  every segment billed at the storage rate;
- useful: the rest.

A `CostAccrued` with `settled_usd` settles a destroyed instance against the provider's
charges: every piece of the attempt is scaled by one factor, so the attempt's cost is the
provider's and the split between categories keeps its proportions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol

from gpujobs.projections import billing_start

USEFUL, PROVISIONING, LOST, IDLE = "useful", "provisioning", "lost", "idle"
CATEGORIES = (USEFUL, PROVISIONING, LOST, IDLE)
WASTE = (PROVISIONING, LOST, IDLE)
# Events that end the worker's run on an attempt.
RUN_ENDS = ("PreemptionDetected", "JobCompleted", "JobFailed", "JobCancelled",
            "InstanceDestroyRequested")
STOP_REQUESTS = ("CancelRequested", "StopRequested")
COST_EVENT_TYPES = (
    *STOP_REQUESTS, "JobSubmitted", "OfferSelected", "InstanceCreated", "WorkerStarted",
    "JobResumed",
    "CheckpointStarted", "CheckpointSaved", "PreemptionDetected", "InstanceDestroyRequested",
    "InstanceDestroyed", "CostAccrued", "JobCompleted", "JobFailed", "JobCancelled",
)


class EventLike(Protocol):
    type: str
    data: dict[str, Any]
    recorded_at: float


@dataclass(frozen=True)
class CostPiece:
    """Part of one billed segment that belongs to one category."""

    job_id: str
    attempt: int
    category: str
    start: float  # unix seconds, real time
    end: float
    amount_usd: float


@dataclass
class _Attempt:
    number: int
    instance_id: int | None = None
    host_id: int | None = None
    gpu_name: str | None = None
    dph_total: float = 0.0
    created_at: float | None = None
    started_at: float | None = None
    run_ended_at: float | None = None
    preempted_at: float | None = None
    destroyed_at: float | None = None
    checkpoint_started: dict[int, float] = field(default_factory=dict)
    durable_step: int | None = None
    durable_saved_at: float | None = None
    segments: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    billed_through: float | None = None
    settlement_usd: float = 0.0  # the provider's charge less the journal's estimate
    settled: bool = False  # a CostAccrued with settled_usd was recorded for this instance


@dataclass(frozen=True)
class AttemptCost:
    job_id: str
    attempt: int
    instance_id: int | None
    host_id: int | None
    gpu_name: str | None
    dph_total: float
    created_at: float | None
    destroyed_at: float | None
    billed_s: float  # billed seconds, as the CostAccrued events state them
    cost_usd: float
    by_category: dict[str, float]
    settled: bool = False  # cost_usd is the provider's charge, not the journal's estimate


@dataclass(frozen=True)
class JobCost:
    job_id: str
    name: str
    team: str
    project: str
    attempts: tuple[AttemptCost, ...]
    pieces: tuple[CostPiece, ...]

    @property
    def cost_usd(self) -> float:
        return sum(a.cost_usd for a in self.attempts)

    def usd(self, category: str) -> float:
        return sum(a.by_category.get(category, 0.0) for a in self.attempts)

    @property
    def useful_usd(self) -> float:
        return self.usd(USEFUL)

    @property
    def waste_usd(self) -> float:
        return sum(self.usd(category) for category in WASTE)


def job_cost(job_id: str, events: Sequence[EventLike]) -> JobCost:
    """Fold one job's events (in stream order) into its cost per attempt and category."""
    submitted = next((e.data for e in events if e.type == "JobSubmitted"), {})
    attempts: dict[int, _Attempt] = {}
    stopping = False
    for event in events:
        # After a cancel or stop request the worker's "stopping" report is the stop we asked
        # for, not a loss, even where it was journaled as PreemptionDetected.
        stopping = stopping or event.type in STOP_REQUESTS
        _fold(attempts, event, stopping)
    costs: list[AttemptCost] = []
    pieces: list[CostPiece] = []
    for number in sorted(attempts):
        attempt_pieces = attempt_pieces_of(job_id, attempts[number])
        pieces.extend(attempt_pieces)
        costs.append(_attempt_cost(job_id, attempts[number], attempt_pieces))
    return JobCost(job_id, str(submitted.get("name", job_id)), str(submitted.get("team", "")),
                   str(submitted.get("project", "")), tuple(costs), tuple(pieces))


def job_costs(events: Iterable[Any]) -> list[JobCost]:
    """Cost of every job in a list of events from several streams (journal order)."""
    streams: dict[str, list[Any]] = {}
    for event in events:
        streams.setdefault(event.stream, []).append(event)
    return [job_cost(job_id, stream) for job_id, stream in streams.items()]


def _fold(attempts: dict[int, _Attempt], event: EventLike, stopping: bool) -> None:
    data = event.data
    if "attempt" not in data or not data["attempt"]:
        return
    number = int(data["attempt"])
    row = attempts.setdefault(number, _Attempt(number))
    at = event.recorded_at
    kind = event.type
    if kind == "OfferSelected":
        row.host_id, row.gpu_name = data.get("host_id"), data.get("gpu_name")
    elif kind == "InstanceCreated":
        row.instance_id, row.dph_total = data["instance_id"], float(data["dph_total"])
        row.created_at = at
        row.billed_through = billing_start(None, data, at)
    elif kind in ("WorkerStarted", "JobResumed") and row.started_at is None:
        row.started_at = at
    elif kind == "CheckpointStarted":
        row.checkpoint_started.setdefault(int(data["step"]), at)
    elif kind == "CheckpointSaved" and (
        row.durable_step is None or data["step"] > row.durable_step
    ):
        row.durable_step, row.durable_saved_at = int(data["step"]), at
    elif kind == "CostAccrued" and data.get("settled_usd") is not None:
        row.settlement_usd += float(data["amount_usd"])
        row.settled = True
    elif kind == "CostAccrued":
        _add_segment(row, data)
    elif kind == "InstanceDestroyed":
        row.destroyed_at = at
    # The checkpoint a worker writes after a stop or cancel request is its last work.
    final_checkpoint = stopping and kind == "CheckpointSaved" and row.started_at is not None
    if (kind in RUN_ENDS or final_checkpoint) and row.run_ended_at is None:
        row.run_ended_at = at
        if kind == "PreemptionDetected" and not stopping:
            row.preempted_at = at


def _add_segment(row: _Attempt, data: dict[str, Any]) -> None:
    end = float(data["through"])
    start = row.billed_through if row.billed_through is not None else end
    row.segments.append((start, end, float(data["amount_usd"]), float(data["dph_total"]),
                         float(data.get("billed_s") or 0.0)))
    row.billed_through = end


def _phases(row: _Attempt) -> list[tuple[float, float, str]]:
    """Return the attempt's timeline as (start, end, category), covering all real time."""
    inf = float("inf")
    if row.started_at is None:
        return [(-inf, inf, PROVISIONING)]
    run_end = row.run_ended_at if row.run_ended_at is not None else inf
    run_end = max(run_end, row.started_at)
    phases = [(-inf, row.started_at, PROVISIONING)]
    lost_from = run_end
    if row.preempted_at is not None:
        lost_from = _durable_reached_at(row)
    lost_from = min(max(lost_from, row.started_at), run_end)
    phases.append((row.started_at, lost_from, USEFUL))
    phases.append((lost_from, run_end, LOST))
    phases.append((run_end, inf, IDLE))
    return [phase for phase in phases if phase[1] > phase[0]]


def _durable_reached_at(row: _Attempt) -> float:
    """When the worker reached the step of the attempt's last durable checkpoint."""
    if row.durable_step is None or row.started_at is None:
        return row.started_at or 0.0
    started = row.checkpoint_started.get(row.durable_step)
    return started if started is not None else float(row.durable_saved_at or row.started_at)


def attempt_pieces_of(job_id: str, row: _Attempt) -> list[CostPiece]:
    pieces: list[CostPiece] = []
    phases = _phases(row)
    for start, end, amount, dph, _ in row.segments:
        if dph < row.dph_total - 1e-12:
            pieces.append(CostPiece(job_id, row.number, IDLE, start, end, amount))
            continue
        pieces.extend(_cut(job_id, row.number, start, end, amount, phases))
    return _settled(job_id, row, pieces)


def _settled(job_id: str, row: _Attempt, pieces: list[CostPiece]) -> list[CostPiece]:
    """Scale the estimated pieces to the provider's charge, keeping their proportions."""
    if row.settlement_usd == 0.0:
        return pieces
    estimated = sum(piece.amount_usd for piece in pieces)
    if estimated <= 0.0:
        at = row.destroyed_at or row.billed_through or 0.0
        return [*pieces, CostPiece(job_id, row.number, IDLE, at, at, row.settlement_usd)]
    scale = (estimated + row.settlement_usd) / estimated
    return [dataclasses.replace(piece, amount_usd=piece.amount_usd * scale) for piece in pieces]


def _cut(job_id: str, attempt: int, start: float, end: float, amount: float,
         phases: list[tuple[float, float, str]]) -> list[CostPiece]:
    if end <= start:
        category = next((c for s, e, c in phases if s <= start < e), IDLE)
        return [CostPiece(job_id, attempt, category, start, end, amount)]
    pieces = []
    for phase_start, phase_end, category in phases:
        lo, hi = max(start, phase_start), min(end, phase_end)
        if hi > lo:
            pieces.append(CostPiece(job_id, attempt, category, lo, hi,
                                    amount * (hi - lo) / (end - start)))
    return pieces


def _attempt_cost(job_id: str, row: _Attempt, pieces: list[CostPiece]) -> AttemptCost:
    by_category = {category: 0.0 for category in CATEGORIES}
    for piece in pieces:
        by_category[piece.category] += piece.amount_usd
    billed_s = sum(segment[4] for segment in row.segments)
    return AttemptCost(
        job_id=job_id, attempt=row.number, instance_id=row.instance_id, host_id=row.host_id,
        gpu_name=row.gpu_name, dph_total=row.dph_total, created_at=row.created_at,
        destroyed_at=row.destroyed_at, billed_s=billed_s,
        cost_usd=sum(segment[2] for segment in row.segments) + row.settlement_usd,
        by_category=by_category, settled=row.settled,
    )


def pieces_between(pieces: Iterable[CostPiece], since: float | None,
                   until: float | None) -> list[CostPiece]:
    """Clip pieces to [since, until], prorating each amount by the time kept."""
    lo_bound = float("-inf") if since is None else since
    hi_bound = float("inf") if until is None else until
    kept: list[CostPiece] = []
    for piece in pieces:
        if piece.end <= piece.start:
            if lo_bound <= piece.start <= hi_bound:
                kept.append(piece)
            continue
        lo, hi = max(piece.start, lo_bound), min(piece.end, hi_bound)
        if hi > lo:
            share = (hi - lo) / (piece.end - piece.start)
            kept.append(CostPiece(piece.job_id, piece.attempt, piece.category, lo, hi,
                                  piece.amount_usd * share))
    return kept
