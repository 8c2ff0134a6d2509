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


def test_midpoint_of_the_two_lists_without_reports() -> None:
    assert estimate() == pytest.approx(115.0)


def test_last_report_raises_the_lower_bound() -> None:
    assert estimate(reported_at=118.0) == pytest.approx(119.0)


def test_missing_next_heartbeat_lowers_the_upper_bound() -> None:
    # Reports every 2 s: the last came at 112, the one due at 114 never did.
    assert estimate(reported_at=112.0, heartbeat_interval_s=2.0) == pytest.approx(113.0)


def test_report_after_the_list_is_clamped_to_the_list() -> None:
    assert estimate(reported_at=125.0, heartbeat_interval_s=2.0) == pytest.approx(120.0)


def test_no_list_since_the_last_bill_starts_the_window_there() -> None:
    assert estimate(seen_at=None) == pytest.approx(110.0)
    assert estimate(seen_at=90.0) == pytest.approx(110.0)


def test_never_before_what_was_already_billed() -> None:
    assert estimate(billed_through=125.0, seen_at=125.0, listed_at=124.0) == pytest.approx(125.0)
