"""The fleet-wide spend sum against the per-instance meters it summarises."""

from __future__ import annotations

import random

import pytest

from gpujobs.emulator.billing import FleetSpend, Meter


def test_fleet_sum_matches_meters() -> None:
    rng = random.Random(5)
    fleet = FleetSpend()
    meters = [Meter(time_scale=3600.0, fleet=fleet) for _ in range(20)]
    now = 1000.0
    for _ in range(500):
        now += rng.uniform(0.0, 2.0)
        meter = rng.choice(meters)
        if rng.random() < 0.3:
            meter.totals(now)  # a read settles the meter too
        else:
            meter.set_rates(rng.choice((0.0, 0.2, 1.5)), rng.choice((0.0, 0.01)), now)
        expected = sum(m.total_usd(now) for m in meters)
        assert fleet.total_usd(now) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_fleet_sum_grows_between_updates() -> None:
    fleet = FleetSpend()
    meter = Meter(time_scale=1.0, fleet=fleet)
    meter.set_rates(3.6, 0.0, now=100.0)  # $0.001 per second
    assert fleet.total_usd(110.0) == pytest.approx(0.01)
    meter.set_rates(0.0, 0.36, now=110.0)
    assert fleet.total_usd(120.0) == pytest.approx(0.011)
    assert meter.total_usd(120.0) == pytest.approx(0.011)
