"""The end-to-end flow: a real digits job on the emulator, preempted once, resumed, finished."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpujobs.demo import DemoOptions, run_demo
from gpujobs.jobs import open_journal
from gpujobs.replay import check_projections
from gpujobs.settings import load_settings
from journal import verify_file

REQUIRED_STATES = {"queued", "provisioning", "running", "checkpointing", "preempted", "resumed",
                   "done"}
GPUJOBS = [sys.executable, "-m", "gpujobs.cli"]


def check_summary(summary: dict) -> None:
    assert summary["state"] == "done"
    assert REQUIRED_STATES <= set(summary["states_visited"])
    assert summary["states_visited"][0] == "queued"
    assert summary["states_visited"][-1] == "done"
    assert summary["preemptions"] == 1
    assert summary["attempts"] == 2
    assert summary["resumed_from_step"] > 0
    assert summary["resumed_from_step"] == summary["last_checkpoint_step_before_preemption"]
    assert summary["test_accuracy"] >= 0.95
    assert summary["instances_alive_at_end"] == 0
    assert summary["cost_usd"] > 0
    assert summary["cost_usd"] == pytest.approx(summary["emulator_charges_usd"], rel=0.03)


@pytest.mark.timeout(240)
async def test_demo_in_process(tmp_path: Path) -> None:
    options = DemoOptions(home=tmp_path / "home", step_delay_s=0.01, grace_period_s=3.0)
    lines: list[str] = []
    summary = await run_demo(options, lines.append)
    check_summary(summary)
    assert any("preempting instance" in line for line in lines)

    settings = load_settings(home=tmp_path / "home")
    assert verify_file(settings.journal_path).ok
    store = await open_journal(settings)
    try:
        count, differences = await check_projections(store)
    finally:
        await store.close()
    assert count > 20
    assert differences == []


@pytest.mark.timeout(300)
def test_demo_command_and_replay(tmp_path: Path) -> None:
    env = dict(os.environ, GPUJOBS_HOME=str(tmp_path / "home"))
    done = subprocess.run(
        [*GPUJOBS, "demo", "--json", "--step-delay-s", "0.01"],
        env=env, capture_output=True, text=True, timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    check_summary(summary)
    assert summary["replay_command"].endswith(f"gpujobs replay --job {summary['job_id']}")

    replayed = subprocess.run(
        [*GPUJOBS, "replay", "--job", summary["job_id"], "--json"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert replayed.returncode == 0, replayed.stderr
    replay = json.loads(replayed.stdout)
    assert replay["job_id"] == summary["job_id"]
    assert replay["state"] == "done"
    assert replay["attempts"] == 2
    assert [t["to"] for t in replay["transitions"]][-1] == "done"
    for transition in replay["transitions"]:
        assert set(transition) >= {"from", "to", "event", "at"}

    verified = subprocess.run([*GPUJOBS, "audit", "verify"], env=env, capture_output=True,
                              text=True, timeout=60)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith("ok:")
