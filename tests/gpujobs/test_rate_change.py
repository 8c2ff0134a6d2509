"""When an instance's billing rate changed, as estimated from lists and worker reports."""

from __future__ import annotations

import pytest

from gpujobs.supervisor.instances import rate_changed_at


def estimate(**changes: float | None) -> float:
    values: dict[str, float | None] = {
        "billed_through": 100.0, "seen_at": 110.0, "listed_at": 120.0, "reported_at": None,
        "heartbeat_interval_s": 0.0,
    }
    values.update(changes)
    return rate_changed_at(**values)  # type: ignore[arg-type]


def test_midpoint_without_reports() -> None:
    assert estimate() == pytest.approx(115.0)


def test_last_report_raises_lower_bound() -> None:
    assert estimate(reported_at=118.0) == pytest.approx(119.0)


def test_missed_heartbeat_lowers_upper_bound() -> None:
    # Reports every 2 s: the last came at 112, the one due at 114 never did.
    assert estimate(reported_at=112.0, heartbeat_interval_s=2.0) == pytest.approx(113.0)


def test_late_report_clamped_to_list() -> None:
    assert estimate(reported_at=125.0, heartbeat_interval_s=2.0) == pytest.approx(120.0)


def test_window_starts_at_last_bill() -> None:
    assert estimate(seen_at=None) == pytest.approx(110.0)
    assert estimate(seen_at=90.0) == pytest.approx(110.0)


def test_never_before_billed_through() -> None:
    assert estimate(billed_through=125.0, seen_at=125.0, listed_at=124.0) == pytest.approx(125.0)
