"""Budgets: dollar limits per team and project per UTC calendar period, and the spend against them.

budgets.yaml contains a list of budgets, each scoped to a team, a project, or a project of one
team, with a period (day, week from Monday, month, or total) and alert thresholds as fractions
of the limit. `BudgetBook` adds up spend per scope from cost records, spread over UTC days so
that a cost which straddles midnight counts in both days.
"""

from __future__ import annotations

import calendar
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from gpujobs.errors import ConfigError
from gpujobs.jobspec import check_name
from gpujobs.profiles import check_environment
from gpujobs.yamlfile import FieldReader, Located, load_yaml

PERIODS = ("day", "week", "month", "total")
ON_EXCEEDED = ("wait", "reject")
BUDGET_KEYS = {"team", "project", "limit_usd", "period", "alert_at", "description"}
ENVIRONMENT_KEYS = {"budgets", "on_exceeded", "description"}
DAY_S = 86400.0


@dataclass(frozen=True)
class Budget:
    team: str | None
    project: str | None
    limit_usd: float
    period: str
    alert_at: tuple[float, ...] = ()

    @property
    def key(self) -> tuple[str | None, str | None, str]:
        """What two budgets must not share: the same scope and period."""
        return self.team, self.project, self.period

    @property
    def who(self) -> str:
        parts = [f"team={self.team}" if self.team else "", f"project={self.project}" if
                 self.project else ""]
        return ",".join(part for part in parts if part)

    def applies_to(self, team: str, project: str) -> bool:
        return (self.team is None or self.team == team) and (
            self.project is None or self.project == project
        )

    def scope(self, now: float) -> str:
        """Scope and current period, such as ``team=research/month=2026-12``."""
        _, _, label = period_window(self.period, now)
        return f"{self.who}/{self.period}" if self.period == "total" else (
            f"{self.who}/{self.period}={label}"
        )


@dataclass(frozen=True)
class BudgetConfig:
    budgets: tuple[Budget, ...] = ()
    on_exceeded: str = "wait"  # a job that does not fit: wait in queued, or fail at once

    def for_job(self, team: str, project: str) -> list[Budget]:
        return [b for b in self.budgets if b.applies_to(team, project)]


def period_window(period: str, now: float) -> tuple[float, float, str]:
    """Return (start, end, label) of the UTC calendar period that contains `now`."""
    moment = datetime.fromtimestamp(now, tz=timezone.utc)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day.timestamp(), (day + timedelta(days=1)).timestamp(), day.strftime("%Y-%m-%d")
    if period == "week":
        start = day - timedelta(days=day.weekday())
        year, week, _ = start.isocalendar()
        return start.timestamp(), (start + timedelta(days=7)).timestamp(), f"{year}-W{week:02d}"
    if period == "month":
        start = day.replace(day=1)
        days = calendar.monthrange(start.year, start.month)[1]
        end = start + timedelta(days=days)
        return start.timestamp(), end.timestamp(), start.strftime("%Y-%m")
    if period == "total":
        return 0.0, float("inf"), "total"
    raise ValueError(f"unknown budget period {period!r}; use one of {', '.join(PERIODS)}")


# Parsing -----------------------------------------------------------------------------------


def parse_budget(item: Any, parent: list[Any], index: int, section: Located) -> Budget:
    where = f"budgets[{index}]"
    if not isinstance(item, Located):
        raise ConfigError(
            f"{where}: expected a mapping (team, project, limit_usd, period, alert_at)",
            path=section.path, line=section.line_of("budgets"), key="budgets",
        )
    fields = FieldReader(item, where)
    team = fields.string("team", required=False)
    project = fields.string("project", required=False)
    limit_usd = fields.number("limit_usd", minimum=0.0, exclusive_minimum=True)
    period = fields.choice("period", PERIODS, default="")
    if not period:
        raise ConfigError(f"{where}: missing required key 'period'; use one of "
                          f"{', '.join(PERIODS)}", path=item.path, line=item.line, key="period")
    alert_at = _alert_thresholds(fields, fields.raw("alert_at"))
    fields.string("description", required=False)
    fields.reject_unknown(BUDGET_KEYS)
    for key, value in (("team", team), ("project", project)):
        if value is not None:
            _check_scope_name(fields, key, value)
    if team is None and project is None:
        raise ConfigError(f"{where}: give a team, a project or both to say whom it limits",
                          path=item.path, line=item.line)
    return Budget(team, project, float(limit_usd or 0.0), period, alert_at)


def _check_scope_name(fields: FieldReader, key: str, value: str) -> None:
    try:
        check_name(value, key)
    except ConfigError as exc:
        raise fields.fail(key, str(exc)) from None


def _alert_thresholds(fields: FieldReader, raw: Any) -> tuple[float, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise fields.fail("alert_at", "expected a list of fractions of the limit, such as "
                          "[0.5, 0.8]")
    values: list[float] = []
    for value in raw:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise fields.fail("alert_at", f"each threshold must be a number in (0, 1], got "
                              f"{value!r}")
        values.append(float(value))
    if values != sorted(set(values)):
        raise fields.fail("alert_at", f"thresholds must increase with no repeats, got {raw!r}")
    return tuple(values)


def _parse_list(raw: Any, holder: Located, key: str) -> list[Budget]:
    if not isinstance(raw, list):
        raise ConfigError(
            f"{key}: expected a list of budgets ('- team: ...'), got "
            f"{'a mapping' if isinstance(raw, Located) else repr(raw)}",
            path=holder.path, line=holder.line_of(key), key=key,
        )
    budgets = [parse_budget(item, raw, index, holder) for index, item in enumerate(raw)]
    seen: dict[tuple, int] = {}
    for index, budget in enumerate(budgets):
        if budget.key in seen:
            raise ConfigError(
                f"budgets[{index}]: {budget.who} already has a {budget.period} budget at "
                f"budgets[{seen[budget.key]}]; keep one",
                path=holder.path, line=_item_line(raw[index], holder, key),
            )
        seen[budget.key] = index
    return budgets


def _item_line(item: Any, holder: Located, key: str) -> int:
    return item.line if isinstance(item, Located) else holder.line_of(key)


@dataclass(frozen=True)
class BudgetsFile:
    path: Path
    budgets: tuple[Budget, ...]
    on_exceeded: str | None
    environments: dict[str, tuple[tuple[Budget, ...] | None, str | None]]


def read_budgets_file(path: Path) -> BudgetsFile:
    """Read and check one budgets.yaml; raises ConfigError naming file, line and key."""
    document = load_yaml(path)
    if not isinstance(document, Located):
        raise ConfigError("expected a mapping with a 'budgets' list at the top", path=str(path))
    top = FieldReader(document, "file")
    raw = top.raw("budgets")
    on_exceeded = top.choice("on_exceeded", ON_EXCEEDED, default="") or None
    environments = top.raw("environments")
    top.reject_unknown({"budgets", "on_exceeded", "environments"})
    budgets = tuple(_parse_list(raw, document, "budgets")) if raw is not None else ()
    return BudgetsFile(path, budgets, on_exceeded, _read_environments(environments, document))


def _read_environments(raw: Any, document: Located) -> dict[str, tuple]:
    if raw is None:
        return {}
    if not isinstance(raw, Located):
        raise ConfigError("environments: expected a mapping of environment name to overrides",
                          path=document.path, line=document.line_of("environments"),
                          key="environments")
    found: dict[str, tuple] = {}
    for name, body in raw.values.items():
        if not isinstance(body, Located):
            raise ConfigError(f"environment {name!r} must be a mapping (budgets, on_exceeded)",
                              path=raw.path, line=raw.line_of(name), key=name)
        fields = FieldReader(body, f"environment {name!r}")
        if "profiles" in body.values:
            raise fields.fail("profiles", f"belongs in gpu_profiles.yaml under "
                              f"environments.{name}")
        budgets = fields.raw("budgets")
        on_exceeded = fields.choice("on_exceeded", ON_EXCEEDED, default="") or None
        fields.string("description", required=False)
        fields.reject_unknown(ENVIRONMENT_KEYS)
        parsed = tuple(_parse_list(budgets, body, "budgets")) if budgets is not None else None
        found[name] = (parsed, on_exceeded)
    return found


def load_budgets(paths: list[Path], env: str | None = None) -> BudgetConfig:
    """Merge budget files in order, then apply environment `env` from every file that has it.

    A budget replaces an earlier one with the same scope and period; others add up. Raises
    ConfigError when `env` is given and no file defines it.
    """
    files = [read_budgets_file(path) for path in paths]
    merged: dict[tuple, Budget] = {}
    on_exceeded = "wait"
    for file in files:
        merged.update((b.key, b) for b in file.budgets)
        on_exceeded = file.on_exceeded or on_exceeded
    if env is not None:
        check_environment(env, [(f.path, set(f.environments)) for f in files], "budgets.yaml")
        for file in files:
            budgets, env_on_exceeded = file.environments.get(env, (None, None))
            merged.update((b.key, b) for b in budgets or ())
            on_exceeded = env_on_exceeded or on_exceeded
    return BudgetConfig(tuple(merged.values()), on_exceeded)


# Spend -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetStatus:
    budget: Budget
    scope: str
    spent_usd: float
    period_start: float
    period_end: float

    @property
    def limit_usd(self) -> float:
        return self.budget.limit_usd

    @property
    def left_usd(self) -> float:
        return self.budget.limit_usd - self.spent_usd

    @property
    def fraction(self) -> float:
        return self.spent_usd / self.budget.limit_usd


def split_by_day(start: float, end: float, amount_usd: float) -> list[tuple[float, float]]:
    """Spread an amount billed evenly over [start, end] across UTC days: [(day_start, usd)]."""
    if end <= start:
        return [(start - start % DAY_S, amount_usd)]
    parts: list[tuple[float, float]] = []
    day = start - start % DAY_S
    while day < end:
        overlap = min(end, day + DAY_S) - max(start, day)
        if overlap > 0:
            parts.append((day, amount_usd * overlap / (end - start)))
        day += DAY_S
    return parts


class BudgetBook:
    """Spend per (team, project) and UTC day, from which any budget's period spend follows."""

    def __init__(self) -> None:
        self._days: dict[tuple[str, str], dict[float, float]] = defaultdict(
            lambda: defaultdict(float)
        )

    def add(self, team: str, project: str, start: float, end: float, amount_usd: float) -> None:
        """Record `amount_usd` billed evenly over [start, end] (unix seconds)."""
        days = self._days[(team, project)]
        for day, usd in split_by_day(start, end, amount_usd):
            days[day] += usd

    def spent(self, budget: Budget, now: float,
              live: Iterable[tuple[str, str, float]] = ()) -> BudgetStatus:
        """Spend in the budget's current period, plus `live` (team, project, usd) not yet billed."""
        start, end, _ = period_window(budget.period, now)
        total = 0.0
        for (team, project), days in self._days.items():
            if budget.applies_to(team, project):
                total += sum(usd for day, usd in days.items() if start <= day < end)
        total += sum(usd for team, project, usd in live if budget.applies_to(team, project))
        return BudgetStatus(budget, budget.scope(now), total, start, end)

    def total_usd(self) -> float:
        return sum(sum(days.values()) for days in self._days.values())
