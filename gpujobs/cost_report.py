"""`gpujobs cost-report`: spend grouped by team, project, job, GPU or UTC day, from the journal.

Each row splits its spend into useful work and the three kinds of waste that `gpujobs.cost`
defines. A time window prorates billed segments by the share of their time inside it.
`reconcile` compares the journal's cost per instance with the API's charges.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gpujobs.budgets import DAY_S
from gpujobs.cost import (
    CATEGORIES, COST_EVENT_TYPES, IDLE, LOST, PROVISIONING, USEFUL, CostPiece, JobCost,
    job_costs, pieces_between,
)
from gpujobs.audit import parse_time  # noqa: F401  (re-exported for the CLI)
from gpujobs.errors import GpujobsError

log = logging.getLogger(__name__)

GROUPINGS = ("team", "project", "job", "gpu", "day")
FORMATS = ("table", "json", "csv")
PLOT_GROUPINGS = ("team", "project")  # a line per group over time stays readable for these
RECONCILE_TOLERANCE = 0.01  # a difference above 1% of the charge is flagged


@dataclass(frozen=True)
class StoredEvent:
    seq: int
    stream: str
    type: str
    data: dict[str, Any]
    recorded_at: float


@dataclass(frozen=True)
class ReportRow:
    group: str
    jobs: int
    attempts: int
    cost_usd: float
    useful_usd: float
    provisioning_usd: float
    lost_usd: float
    idle_usd: float

    @property
    def waste_usd(self) -> float:
        return self.provisioning_usd + self.lost_usd + self.idle_usd

    @property
    def waste_pct(self) -> float:
        return 100.0 * self.waste_usd / self.cost_usd if self.cost_usd else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["waste_usd"] = self.waste_usd
        data["waste_pct"] = self.waste_pct
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in data.items()}


async def load_job_costs(store: Any) -> list[JobCost]:
    """Read the events that carry cost (one query) and fold them per job."""
    placeholders = ", ".join("?" for _ in COST_EVENT_TYPES)
    rows = await store.query(
        f"SELECT seq, stream, type, data, recorded_at FROM events WHERE type IN "
        f"({placeholders}) ORDER BY seq", COST_EVENT_TYPES,
    )
    events = [StoredEvent(int(r[0]), r[1], r[2], json.loads(r[3]), float(r[4])) for r in rows]
    return job_costs(events)


def _group_of(by: str, job: JobCost, piece: CostPiece, gpus: dict[int, str]) -> str:
    if by == "team":
        return job.team
    if by == "project":
        return f"{job.team}/{job.project}"
    if by == "job":
        return job.job_id
    if by == "gpu":
        return gpus.get(piece.attempt) or "unknown"
    return datetime.fromtimestamp(piece.start, tz=timezone.utc).strftime("%Y-%m-%d")


def _by_day(pieces: Iterable[CostPiece]) -> list[CostPiece]:
    """Cut pieces at UTC midnights so that each lies within one day."""
    cut: list[CostPiece] = []
    for piece in pieces:
        day = piece.start - piece.start % DAY_S
        if piece.end <= day + DAY_S:
            cut.append(piece)
            continue
        while day < piece.end:
            cut.extend(pieces_between([piece], max(day, piece.start), min(day + DAY_S, piece.end)))
            day += DAY_S
    return cut


def report_rows(costs: Iterable[JobCost], by: str, since: float | None = None,
                until: float | None = None) -> list[ReportRow]:
    """Group spend by `by`, clipped to [since, until]; rows sorted by cost, highest first."""
    if by not in GROUPINGS:
        raise GpujobsError(f"invalid grouping {by!r}; use one of {', '.join(GROUPINGS)}")
    sums: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(CATEGORIES, 0.0))
    jobs: dict[str, set[str]] = defaultdict(set)
    attempts: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for job in costs:
        gpus = {a.attempt: a.gpu_name or "unknown" for a in job.attempts}
        pieces = pieces_between(job.pieces, since, until)
        if by == "day":
            pieces = _by_day(pieces)
        for piece in pieces:
            group = _group_of(by, job, piece, gpus)
            sums[group][piece.category] += piece.amount_usd
            jobs[group].add(job.job_id)
            attempts[group].add((job.job_id, piece.attempt))
    rows = [
        ReportRow(group, len(jobs[group]), len(attempts[group]), sum(values.values()),
                  values[USEFUL], values[PROVISIONING], values[LOST], values[IDLE])
        for group, values in sums.items()
    ]
    # Rounded, so that costs equal but for float noise sort by name.
    rows.sort(key=lambda row: row.group if by == "day" else (-round(row.cost_usd, 9), row.group))
    return rows


def total_row(rows: list[ReportRow]) -> ReportRow:
    return ReportRow(
        "total", sum(r.jobs for r in rows), sum(r.attempts for r in rows),
        sum(r.cost_usd for r in rows), sum(r.useful_usd for r in rows),
        sum(r.provisioning_usd for r in rows), sum(r.lost_usd for r in rows),
        sum(r.idle_usd for r in rows),
    )


def format_rows(rows: list[ReportRow], by: str, fmt: str) -> str:
    """Render rows as JSON or CSV; the table form is drawn by the CLI with rich."""
    if fmt == "json":
        return json.dumps({"by": by, "rows": [r.to_dict() for r in rows],
                           "total": total_row(rows).to_dict()}, indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        columns = list(rows[0].to_dict()) if rows else list(total_row([]).to_dict())
        writer = csv.DictWriter(buffer, fieldnames=[by if c == "group" else c for c in columns],
                                lineterminator="\n")
        writer.writeheader()
        for row in rows:
            data = row.to_dict()
            data[by] = data.pop("group")
            writer.writerow(data)
        return buffer.getvalue()
    raise GpujobsError(f"invalid format {fmt!r}; use one of {', '.join(FORMATS)}")


# Reconcile ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReconcileRow:
    instance_id: int
    job_id: str | None
    attempt: int | None
    journal_usd: float
    charged_usd: float | None  # None: the API has no charge for this instance
    live: bool  # not destroyed yet: the journal lags by the time since it last billed
    # False: destroyed, but the supervisor has not settled it against the charges yet, so
    # journal_usd is its own estimate.
    settled: bool = True

    @property
    def diff_usd(self) -> float:
        return self.journal_usd - (self.charged_usd or 0.0)

    @property
    def matches(self) -> bool:
        if self.charged_usd is None:
            return self.journal_usd == 0.0
        return abs(self.diff_usd) <= RECONCILE_TOLERANCE * max(self.charged_usd, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["diff_usd"] = round(self.diff_usd, 6)
        data["matches"] = self.matches
        return data


def _charge_instance_id(charge: dict[str, Any]) -> int | None:
    metadata = charge.get("metadata") or {}
    if isinstance(metadata, dict) and isinstance(metadata.get("instance_id"), int):
        return int(metadata["instance_id"])
    source = str(charge.get("source") or "")
    if source.startswith("instance-") and source[len("instance-"):].isdigit():
        return int(source[len("instance-"):])
    return None


def charges_by_instance(charges: list[dict[str, Any]]) -> dict[int, float]:
    """Sum the charges endpoint's instance rows per instance id."""
    charged: dict[int, float] = defaultdict(float)
    for charge in charges:
        instance_id = _charge_instance_id(charge)
        if instance_id is not None and charge.get("type", "instance") == "instance":
            charged[instance_id] += float(charge.get("amount") or 0.0)
    return charged


async def reconcile(costs: list[JobCost], client: Any, since: float | None = None,
                    until: float | None = None) -> list[ReconcileRow]:
    """Compare the journal's cost per instance with the API's charges over the window."""
    created = [a.created_at for job in costs for a in job.attempts if a.created_at]
    start = since
    if start is None:
        start = min(created) if created else time.time() - DAY_S
    end = until if until is not None else time.time()
    charged = charges_by_instance(await client.charges(start=start, end=end))
    rows: list[ReconcileRow] = []
    for job in costs:
        for attempt in job.attempts:
            if attempt.instance_id is None:
                continue
            rows.append(ReconcileRow(
                int(attempt.instance_id), job.job_id, attempt.attempt, attempt.cost_usd,
                charged.pop(int(attempt.instance_id), None), attempt.destroyed_at is None,
                attempt.settled,
            ))
    rows.extend(ReconcileRow(i, None, None, 0.0, usd, False) for i, usd in charged.items())
    return rows


# Plot --------------------------------------------------------------------------------------


def plot_report(costs: list[JobCost], path: Path, by: str = "team", since: float | None = None,
                until: float | None = None) -> Path:
    """Draw cumulative spend over time per team or project, and useful vs wasted spend."""
    check_plot_grouping(by)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (timeline, split) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = _cumulative(costs, by, since, until)
    for group, points in sorted(series.items()):
        times = [datetime.fromtimestamp(t, tz=timezone.utc) for t, _ in points]
        timeline.plot(times, [usd for _, usd in points], label=group)
    timeline.set_title(f"cumulative spend per {by}")
    timeline.set_ylabel("USD")
    timeline.set_xlabel("time (UTC)")
    timeline.tick_params(axis="x", labelrotation=30)
    if series:
        timeline.legend()
    rows = report_rows(costs, by, since, until)
    _stacked_bars(split, rows)
    split.set_title(f"useful vs wasted spend per {by}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def check_plot_grouping(by: str) -> None:
    """Raise GpujobsError unless the plot can group by `by` (team or project)."""
    if by not in PLOT_GROUPINGS:
        raise GpujobsError(f"--plot draws spend per team or project, not per {by}; use --by "
                           "team or --by project with --plot")


def _cumulative(costs: list[JobCost], by: str, since: float | None, until: float | None,
                samples: int = 200) -> dict[str, list[tuple[float, float]]]:
    """Spend so far per group at evenly spaced times, billing each piece evenly over its span."""
    pieces: dict[str, list[CostPiece]] = defaultdict(list)
    for job in costs:
        group = job.team if by == "team" else f"{job.team}/{job.project}"
        pieces[group].extend(pieces_between(job.pieces, since, until))
    every = [p for group in pieces.values() for p in group]
    if not every:
        return {}
    first, last = min(p.start for p in every), max(p.end for p in every)
    step = (last - first) / (samples - 1) if last > first else 1.0
    times = [first + i * step for i in range(samples)]
    return {group: [(t, sum(_share(p, t) for p in items)) for t in times]
            for group, items in pieces.items()}


def _share(piece: CostPiece, at: float) -> float:
    if at >= piece.end:
        return piece.amount_usd
    if at <= piece.start:
        return 0.0
    return piece.amount_usd * (at - piece.start) / (piece.end - piece.start)


def _stacked_bars(axis: Any, rows: list[ReportRow]) -> None:
    names = [row.group for row in rows]
    bottom = [0.0] * len(rows)
    colors = {USEFUL: "tab:green", PROVISIONING: "tab:orange", LOST: "tab:red",
              IDLE: "tab:gray"}
    for category in CATEGORIES:
        values = [getattr(row, f"{category}_usd") for row in rows]
        axis.bar(names, values, bottom=bottom, label=category, color=colors[category])
        bottom = [b + v for b, v in zip(bottom, values)]
    axis.set_ylabel("USD")
    axis.legend()
