"""budgets.yaml validation, environments, UTC calendar periods and the spend book."""

from __future__ import annotations

import heapq
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

from gpujobs.budgets import (
    Budget, BudgetBook, BudgetConfig, load_budgets, period_window, split_by_day,
)
from gpujobs.errors import ConfigError
from gpujobs.settings import SHIPPED_CONFIG_DIR
from gpujobs.supervisor.budget_guard import BudgetGuard, _over_max_duration

BASE = ("budgets:\n  - team: research\n    limit_usd: 100\n    period: month\n"
        "    alert_at: [0.5, 0.8]\non_exceeded: wait\n")


def utc(*parts: int) -> float:
    return datetime(*parts, tzinfo=timezone.utc).timestamp()


CASES = [
    ("unknown key", BASE.replace("    period: month\n", "    period: month\n    colour: red\n"),
     "5: budgets[0]: colour: unknown key; expected one of: alert_at, description, limit_usd, "
     "period, project, team"),
    ("bad period", BASE.replace("period: month", "period: year"),
     "4: budgets[0]: period: expected one of day, week, month, total, got str 'year'"),
    ("missing period", BASE.replace("    period: month\n", ""),
     "2: budgets[0]: missing required key 'period'; use one of day, week, month, total"),
    ("zero limit", BASE.replace("limit_usd: 100", "limit_usd: 0"),
     "3: budgets[0]: limit_usd: must be greater than 0, got 0"),
    ("nan limit", BASE.replace("limit_usd: 100", "limit_usd: .nan"),
     "3: limit_usd: expected a finite number, got .nan"),
    ("infinite limit", BASE.replace("limit_usd: 100", "limit_usd: .inf"),
     "3: limit_usd: expected a finite number, got .inf"),
    ("nan alert", BASE.replace("[0.5, 0.8]", "[0.5, .NaN]"),
     "5: alert_at: expected a finite number, got .NaN"),
    ("octal limit", BASE.replace("limit_usd: 100", "limit_usd: 0100"),
     "3: limit_usd: YAML 1.1 reads 0100 as the octal number 64; write 100 without the "
     "leading zero, or quote '0100' for a string"),
    ("base 60 limit", BASE.replace("limit_usd: 100", "limit_usd: 1:40"),
     "3: limit_usd: YAML 1.1 reads 1:40 as the base-60 number 100; write 100, or quote "
     "'1:40' for a string"),
    ("quoted limit", BASE.replace("limit_usd: 100", "limit_usd: '100'"),
     "3: budgets[0]: limit_usd: expected a number, got the string '100'; remove the quotes"),
    ("unordered alerts", BASE.replace("[0.5, 0.8]", "[0.8, 0.5]"),
     "5: budgets[0]: alert_at: thresholds must increase with no repeats, got [0.8, 0.5]"),
    ("alert as percent", BASE.replace("[0.5, 0.8]", "[50]"),
     "5: budgets[0]: alert_at: each threshold must be a number in (0, 1], got 50"),
    ("alert not list", BASE.replace("[0.5, 0.8]", "0.5"),
     "5: budgets[0]: alert_at: expected a list of fractions of the limit, such as [0.5, 0.8]"),
    ("no scope", BASE.replace("  - team: research\n    limit_usd", "  - limit_usd"),
     "2: budgets[0]: give a team, a project or both to say whom it limits"),
    ("bad team name", BASE.replace("team: research", "team: 'my team'"),
     "2: budgets[0]: team: invalid team 'my team': use 1-63 letters, digits, '.', '_' or '-', "
     "starting with a letter or digit"),
    ("duplicate scope", BASE.replace("on_exceeded: wait\n", "")
     + "  - team: research\n    limit_usd: 5\n    period: month\n",
     "6: budgets[1]: team=research already has a month budget at budgets[0]; keep one"),
    ("yaml 1.1 boolean", BASE.replace("on_exceeded: wait", "on_exceeded: no"),
     "6: file: on_exceeded: expected one of wait, reject, got the boolean false (YAML reads "
     "yes/no/on/off as booleans; quote it)"),
    ("unknown top key", BASE + "budget: []\n",
     "7: file: budget: unknown key; expected one of: budgets, environments, on_exceeded"),
    ("not a list", "budgets:\n  team: x\n",
     "1: budgets: expected a list of budgets ('- team: ...'), got a mapping"),
    ("item not mapping", "budgets:\n  - 3\n",
     "1: budgets[0]: expected a mapping (team, project, limit_usd, period, alert_at)"),
    ("profiles in budgets env", BASE + "environments:\n  dev:\n    profiles: {}\n",
     "9: environment 'dev': profiles: belongs in gpu_profiles.yaml under environments.dev"),
    ("bad env on_exceeded", BASE + "environments:\n  dev:\n    on_exceeded: later\n",
     "9: environment 'dev': on_exceeded: expected one of wait, reject, got str 'later'"),
]


@pytest.mark.parametrize("text, expected", [(t, e) for _, t, e in CASES],
                         ids=[name for name, _, _ in CASES])
def test_budget_error_message(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "budgets.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_budgets([path])
    assert str(caught.value) == f"{path}:{expected}"


def test_shipped_budgets_load() -> None:
    config = load_budgets([SHIPPED_CONFIG_DIR / "budgets.yaml"])
    assert config.on_exceeded == "wait"
    assert len(config.budgets) == 3
    dev = load_budgets([SHIPPED_CONFIG_DIR / "budgets.yaml"], env="dev")
    assert dev.on_exceeded == "reject"
    research = [b for b in dev.budgets if b.key == ("research", None, "month")]
    assert research[0].limit_usd == 50.0


def test_environment_replaces_same_scope(tmp_path: Path) -> None:
    path = tmp_path / "budgets.yaml"
    path.write_text(BASE + "environments:\n  dev:\n    budgets:\n      - team: research\n"
                    "        limit_usd: 10\n        period: month\n      - project: digits\n"
                    "        limit_usd: 3\n        period: day\n")
    dev = load_budgets([path], env="dev")
    assert [(b.team, b.project, b.limit_usd) for b in dev.budgets] == [
        ("research", None, 10.0), (None, "digits", 3.0),
    ]
    assert dev.on_exceeded == "wait"
    with pytest.raises(ConfigError) as caught:
        load_budgets([path], env="prod")
    assert str(caught.value) == (
        f"environment 'prod' is not defined in {path}; defined: dev; add it under "
        "'environments:' or fix GPUJOBS_ENV / --env"
    )


def test_later_file_replaces_scope(tmp_path: Path) -> None:
    first = tmp_path / "a.yaml"
    first.write_text(BASE)
    second = tmp_path / "b.yaml"
    second.write_text("budgets:\n  - team: research\n    limit_usd: 7\n    period: month\n"
                      "on_exceeded: reject\n")
    config = load_budgets([first, second])
    assert [b.limit_usd for b in config.budgets] == [7.0]
    assert config.on_exceeded == "reject"


def test_budget_scopes_apply() -> None:
    team = Budget("research", None, 10.0, "day")
    both = Budget("research", "digits", 10.0, "day")
    project = Budget(None, "digits", 10.0, "day")
    assert team.applies_to("research", "other")
    assert not both.applies_to("research", "other")
    assert both.applies_to("research", "digits")
    assert project.applies_to("platform", "digits")
    assert not team.applies_to("platform", "digits")


@pytest.mark.parametrize("period, start, end, label", [
    ("day", utc(2026, 12, 4), utc(2026, 12, 5), "2026-12-04"),
    ("week", utc(2026, 11, 30), utc(2026, 12, 7), "2026-W49"),
    ("month", utc(2026, 12, 1), utc(2027, 1, 1), "2026-12"),
])
def test_period_window_is_utc_calendar(period: str, start: float, end: float,
                                       label: str) -> None:
    assert period_window(period, utc(2026, 12, 4, 16, 30)) == (start, end, label)


def test_period_window_total_and_scope_label() -> None:
    assert period_window("total", utc(2026, 1, 1)) == (0.0, float("inf"), "total")
    now = utc(2026, 2, 28, 23, 0)
    assert Budget("a", "b", 1.0, "month").scope(now) == "team=a,project=b/month=2026-02"
    assert Budget("a", None, 1.0, "total").scope(now) == "team=a/total"
    assert period_window("month", now)[1] == utc(2026, 3, 1)


def test_split_by_day_prorates_midnight() -> None:
    parts = split_by_day(utc(2026, 12, 4, 23), utc(2026, 12, 5, 1), 2.0)
    assert parts == [(utc(2026, 12, 4), 1.0), (utc(2026, 12, 5), 1.0)]


def test_book_spend_per_period_and_scope() -> None:
    book = BudgetBook()
    book.add("research", "digits", utc(2026, 12, 4, 10), utc(2026, 12, 4, 11), 3.0)
    book.add("research", "other", utc(2026, 12, 3, 23), utc(2026, 12, 4, 1), 4.0)
    book.add("platform", "digits", utc(2026, 11, 20, 10), utc(2026, 11, 20, 11), 5.0)
    now = utc(2026, 12, 4, 12)
    assert book.spent(Budget("research", None, 10, "day"), now).spent_usd == 5.0
    assert book.spent(Budget("research", None, 10, "month"), now).spent_usd == 7.0
    assert book.spent(Budget(None, "digits", 10, "month"), now).spent_usd == 3.0
    assert book.spent(Budget(None, "digits", 10, "total"), now).spent_usd == 8.0
    live = [("research", "digits", 0.5), ("platform", "x", 9.0)]
    status = book.spent(Budget("research", None, 10, "day"), now, live)
    assert status.spent_usd == 5.5
    assert status.left_usd == 4.5
    assert status.scope == "team=research/day=2026-12-04"
    assert book.total_usd() == 12.0


def test_guard_fold_tracks_running_time_and_spend() -> None:
    guard = BudgetGuard(BudgetConfig(), (), None)
    now = utc(2026, 12, 4, 12)
    profile = {"max_dph": 0.5, "max_duration_hours": 3.0}
    rows = [
        ("JobSubmitted", {"team": "t", "project": "p", "profile": profile}, now),
        ("InstanceCreated", {"attempt": 1}, now + 10),
        ("WorkerStarted", {"attempt": 1}, now + 20),
        ("CostAccrued", {"attempt": 1, "amount_usd": 0.25, "through": now + 70}, now + 70),
        ("PreemptionDetected", {"attempt": 1}, now + 80),
        ("InstanceCreated", {"attempt": 2}, now + 100),
        ("JobResumed", {"attempt": 2}, now + 130),
        ("BudgetAlert", {"scope": "team=t/total", "threshold": 0.5}, now + 131),
    ]
    for seq, (kind, data, at) in enumerate(rows, start=1):
        guard.fold(seq, "j", kind, data, at)
    facts = guard.jobs["j"]
    assert facts.running_s(now + 140) == 70.0  # 60 s on attempt 1, 10 s on attempt 2
    assert facts.last_cost_seq == 4
    assert guard.book.spent(Budget("t", None, 1.0, "day"), now).spent_usd == 0.25
    assert guard.billed_through[("j", 1)] == now + 70
    assert guard.billed_through[("j", 2)] == now + 100
    assert ("team=t/total", 0.5) in guard.alerted


def test_max_duration_checks_only_jobs_due() -> None:
    """A job is reported once its runs add up to the limit, not at an earlier run's moment."""
    guard = BudgetGuard(BudgetConfig(), (), None)
    job = {"state": "running", "stop_reason": None, "cancel_requested": False}
    sup = SimpleNamespace(billing_time_scale=1.0, settings=SimpleNamespace(tick_s=5.0),
                          table=SimpleNamespace(jobs={"j": job, "idle": dict(job)}))
    now = utc(2026, 12, 4, 12)
    profile = {"max_dph": 0.5, "max_duration_hours": 1.0}
    for stream in ("j", "idle"):
        guard.fold(1, stream, "JobSubmitted", {"team": "t", "project": "p", "profile": profile},
                   now)
    guard.fold(2, "j", "WorkerStarted", {"attempt": 1}, now)
    guard.fold(3, "j", "PreemptionDetected", {"attempt": 1}, now + 1800)
    guard.fold(4, "j", "JobResumed", {"attempt": 2}, now + 2400)

    # The first run alone would have reached the hour at now + 3600; the two runs reach it at
    # now + 4200, after 1800 s of the second run.
    heapq.heappush(guard.duration_due, (now + 3600, "j"))  # as a tick during the first run would
    assert _over_max_duration(sup, guard, now + 4190) == []
    over = _over_max_duration(sup, guard, now + 4200)
    assert over == [("j", "max_duration_hours reached: ran 1.00 h of 1 h")]
    assert _over_max_duration(sup, guard, now + 4201) == []  # rechecked after one tick
    assert [job_id for job_id, _ in _over_max_duration(sup, guard, now + 4206)] == ["j"]
    job["stop_reason"] = "max_duration_hours reached"
    assert _over_max_duration(sup, guard, now + 4300) == []
    assert guard.duration_due == []  # a stopping job leaves the heap; "idle" never ran


def test_max_duration_after_run_ended() -> None:
    guard = BudgetGuard(BudgetConfig(), (), None)
    job = {"state": "preempted", "stop_reason": None, "cancel_requested": False}
    sup = SimpleNamespace(billing_time_scale=60.0, settings=SimpleNamespace(tick_s=5.0),
                          table=SimpleNamespace(jobs={"j": job}))
    now = utc(2026, 12, 4, 12)
    profile = {"max_dph": 0.5, "max_duration_hours": 1.0}
    guard.fold(1, "j", "JobSubmitted", {"team": "t", "project": "p", "profile": profile}, now)
    guard.fold(2, "j", "WorkerStarted", {"attempt": 1}, now)
    guard.fold(3, "j", "PreemptionDetected", {"attempt": 1}, now + 61)  # 61 billed minutes

    over = _over_max_duration(sup, guard, now + 100)
    assert over == [("j", "max_duration_hours reached: ran 1.02 h of 1 h")]
