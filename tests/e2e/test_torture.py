"""Crash torture, short version: about 10 SIGKILLs of the real supervisor process.

The long version is bench/torture.py; docs/torture.md describes both and records a long run.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from gpujobs.emulator import FaultPlan
from tests.e2e.torture import (
    DESTROY_ENDPOINT, SupervisorProcess, TortureConfig, TortureEmulator,
    child_env, find_early_destroys, find_overlaps, match_costs, read_journal, run_cli,
    run_torture, write_config_dir,
)

CI_CONFIG = TortureConfig(seed=7, kills=10, jobs=3, max_jobs_in_flight=3,
                          cancel_fraction=0.34, settle_timeout_s=100.0)


@pytest.mark.timeout(280)
async def test_torture_keeps_invariants(tmp_path: Path) -> None:
    report = await run_torture(CI_CONFIG, tmp_path / "torture")
    where = f"(files in {report.home}, seed {CI_CONFIG.seed})"

    assert report.kills == CI_CONFIG.kills
    assert report.supervisor_exits == [], where
    assert report.submit_failures == [], where
    assert len(report.jobs) >= CI_CONFIG.jobs
    wrong = {job: state for job, state in report.jobs.items()
             if state not in report.expected[job]}
    assert wrong == {}, where
    assert report.samples > 100
    assert report.max_live_per_job <= 1, report.doubled_samples[:5]
    assert report.overlaps == [], where
    assert report.live_at_end == [], where
    assert report.unknown_labels == [], where
    assert report.early_destroy_records == [], where
    assert report.audit_ok, report.audit_output
    assert report.replay_ok, report.replay_output
    # Every destroyed instance is settled against the emulator's charges, so the journal's
    # cost is the emulator's bill. The estimate before settling is in the summary only.
    assert report.costs and all(c.settled for c in report.costs if c.emulator_usd > 0), where
    assert abs(report.cost_gap) <= CI_CONFIG.cost_tolerance, (
        f"journal ${report.journal_total_usd:.6f} vs emulator "
        f"${report.emulator_total_usd:.6f} {where}")


@pytest.mark.timeout(120)
async def test_destroy_resent_after_kill(tmp_path: Path) -> None:
    """A kill between InstanceDestroyRequested and the DELETE must not leak the instance."""
    emulator = TortureEmulator(seed=3, loading_s=60.0, workdir=tmp_path / "emulator",
                               rate_limits=False, offers_per_gpu=20, reply_delays_s={})
    await emulator.start()
    home = tmp_path / "home"
    home.mkdir()
    env = child_env(home, emulator, write_config_dir(home))
    supervisor = SupervisorProcess(env, 0.3, tmp_path / "supervisor.log")
    try:
        await supervisor.start()
        spec = tmp_path / "job.yaml"
        spec.write_text(yaml.safe_dump({"name": "lost", "profile": "torture",
                                        "total_steps": 100, "step_delay_s": 0.01}))
        code, output = await run_cli(env, "submit", str(spec))
        assert code == 0, output
        instance_id = await wait_for_attempt(home, "created", 30.0)

        # Every DELETE fails until the kill, so the destroy intent has no outcome yet.
        emulator.set_faults(FaultPlan.from_data(
            [{"kind": "burst_5xx", "endpoint": DESTROY_ENDPOINT, "count": 1000}]))
        await emulator.set_offline(instance_id)
        await wait_for_attempt(home, "destroy_requested", 20.0)
        await asyncio.sleep(0.5)
        await supervisor.kill()
        emulator.set_faults(FaultPlan())
        await supervisor.start()

        destroyed = await wait_until_destroyed(emulator, home, instance_id, 30.0)
        assert instance_id not in emulator.live_instance_ids(), (
            f"instance {instance_id} is still alive 30 s after the restart; "
            f"see {supervisor.log_path}")
        assert destroyed, f"the journal never recorded instance {instance_id} destroyed"
    finally:
        await supervisor.kill()
        await emulator.stop()


async def wait_for_attempt(home: Path, status: str, timeout_s: float) -> int:
    """Wait until attempt 1 has `status` in the journal; return its instance id."""
    deadline = time.monotonic() + timeout_s
    sql = "SELECT status, instance_id FROM attempts WHERE attempt = 1 AND status = ?"
    while time.monotonic() < deadline:
        rows = await asyncio.to_thread(read_journal, home / "journal.db", sql, (status,))
        if rows:
            return int(rows[0][1])
        await asyncio.sleep(0.1)
    raise AssertionError(f"attempt 1 did not reach {status} within {timeout_s} s")


async def wait_until_destroyed(emulator: TortureEmulator, home: Path, instance_id: int,
                               timeout_s: float) -> bool:
    """Wait until the emulator and the journal both have the instance destroyed."""
    deadline = time.monotonic() + timeout_s
    sql = "SELECT 1 FROM attempts WHERE instance_id = ? AND status = 'destroyed'"
    while time.monotonic() < deadline:
        recorded = await asyncio.to_thread(read_journal, home / "journal.db", sql, (instance_id,))
        if recorded and instance_id not in emulator.live_instance_ids():
            return True
        await asyncio.sleep(0.2)
    return False


def ledger_row(instance_id: int, label: str, created_at: float,
               destroyed_at: float | None, cost_usd: float = 0.001) -> dict:
    return {"id": instance_id, "label": label, "created_at": created_at,
            "destroyed_at": destroyed_at, "cost_usd": cost_usd}


def test_overlap_check_flags_two_live_instances() -> None:
    ledger = [ledger_row(1, "gpujobs:a-1:1", 100.0, 110.0),
              ledger_row(2, "gpujobs:a-1:2", 109.0, 120.0),
              ledger_row(3, "gpujobs:b-2:1", 100.0, 105.0),
              ledger_row(4, "gpujobs:b-2:2", 105.0, None)]
    found = find_overlaps(ledger)
    assert len(found) == 1
    assert "instance 2" in found[0]


def test_cost_match_pairs_by_instance() -> None:
    def cost(instance_id: int, amount_usd: float, billed_s: float, through: float):
        return SimpleNamespace(type="CostAccrued", data={
            "instance_id": instance_id, "amount_usd": amount_usd, "billed_s": billed_s,
            "through": through})

    events = [cost(1, 0.4, 4.0, 15.0), cost(1, 0.5, 5.0, 20.0), cost(9, 0.2, 1.0, 5.0)]
    costs = {c.instance_id: c for c in match_costs([ledger_row(1, "x", 10.0, 21.0, 1.0)],
                                                   events)}
    assert costs[1].journal_usd == pytest.approx(0.9)
    assert costs[1].gap == pytest.approx(-0.1)
    assert costs[1].start_lag_s == pytest.approx(1.0)
    assert costs[1].end_lag_s == pytest.approx(-1.0)
    assert costs[9].emulator_usd == 0.0
    assert costs[9].journal_usd == pytest.approx(0.2)


def test_destroy_recorded_before_emulator_is_flagged() -> None:
    ledger = [ledger_row(1, "gpujobs:a-1:1", 100.0, 110.0)]
    early = SimpleNamespace(type="InstanceDestroyed", data={"instance_id": 1}, stream="a-1",
                            seq=5, recorded_at=109.0)
    late = SimpleNamespace(type="InstanceDestroyed", data={"instance_id": 1}, stream="a-1",
                           seq=6, recorded_at=111.0)
    assert len(find_early_destroys(ledger, [early])) == 1
    assert find_early_destroys(ledger, [late]) == []

