"""Outbid interruptible instances that come back on the same host: wait and rebid policies."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gpujobs.settings import load_settings
from tests.e2e.harness import (
    Stack, live_stack, start_new_supervisor, stop_supervisor, wait_for_checkpoint,
)

pytestmark = pytest.mark.timeout(180)

PROFILE = """\
profiles:
  spot:
    gpu_name: RTX_4090
    num_gpus: 1
    max_dph: 0.40
    reliability_min: 0.90
    max_duration_hours: 2
    interruptible: true
    bid_margin: 0.2
    on_preemption: {policy}
    resume_wait_s: {wait_s}
"""


def use_profile(tmp_path: Path, monkeypatch, policy: str, wait_s: float) -> Path:
    config = tmp_path / "config"
    config.mkdir()
    (config / "gpu_profiles.yaml").write_text(PROFILE.format(policy=policy, wait_s=wait_s))
    monkeypatch.setenv("GPUJOBS_CONFIG_DIR", str(config))
    return tmp_path / "home"


async def preempt_after_checkpoint(stack: Stack) -> tuple[str, int]:
    """Submit a spot job, outbid its instance once it has a checkpoint; return both ids."""
    job_id = await stack.submit(profile="spot", total_steps=300, step_delay_s=0.01)
    instance_id = await wait_for_checkpoint(stack, job_id)
    await stack.emulator.preempt(instance_id, sigterm=True, grace_s=2.0)
    await stack.wait_for(lambda: stack.state(job_id) == "preempted", what="preempted")
    return job_id, instance_id


async def run_outbid(tmp_path: Path, monkeypatch, policy: str, wait_s: float,
                     restart_by_hand: bool) -> tuple[dict, list]:
    home = use_profile(tmp_path, monkeypatch, policy, wait_s)
    async with live_stack(home, config_dirs=load_settings(home=home).config_dirs) as stack:
        stack.start_loop()
        job_id, instance_id = await preempt_after_checkpoint(stack)
        if restart_by_hand:
            await asyncio.sleep(0.5)
            await stack.client.start_instance(instance_id)  # the host gave it back
        job = await stack.wait_settled(job_id)
        events = await stack.supervisor.store.read_stream(job_id)
        return job, [(e.type, e.data.get("attempt")) for e in events], stack.emulator.ledger()


async def test_wait_policy_resumes_on_the_same_instance(tmp_path: Path, monkeypatch) -> None:
    job, events, ledger = await run_outbid(tmp_path, monkeypatch, "wait", 60, True)
    assert job["state"] == "done"
    assert job["attempt"] == 1
    assert len(ledger) == 1  # no second machine was rented
    assert ("PreemptionDetected", 1) in events
    assert ("JobResumed", 1) in events
    assert job["resumed_from_step"] > 0


async def test_rebid_policy_raises_the_bid(tmp_path: Path, monkeypatch) -> None:
    job, events, ledger = await run_outbid(tmp_path, monkeypatch, "rebid", 60, False)
    assert job["state"] == "done"
    assert len(ledger) == 1
    assert ("JobResumed", 1) in events


async def test_wait_policy_migrates_after_the_limit(tmp_path: Path, monkeypatch) -> None:
    job, events, ledger = await run_outbid(tmp_path, monkeypatch, "wait", 1, False)
    assert job["state"] == "done"
    assert job["attempt"] == 2
    assert len(ledger) == 2
    assert all(row["destroyed_at"] is not None for row in ledger)


async def test_wait_limit_holds_across_restart(tmp_path: Path, monkeypatch) -> None:
    wait_s = 6.0
    home = use_profile(tmp_path, monkeypatch, "wait", wait_s)
    async with live_stack(home, config_dirs=load_settings(home=home).config_dirs) as stack:
        stack.start_loop()
        job_id, instance_id = await preempt_after_checkpoint(stack)
        await stop_supervisor(stack)
        await asyncio.sleep(wait_s + 1.0)  # the supervisor is down while the limit passes
        await start_new_supervisor(stack)
        try:
            preempted = [e for e in await stack.supervisor.store.read_stream(job_id)
                         if e.type == "PreemptionDetected"]
            rebuilt_at = stack.supervisor.table.runtime_for(job_id).preempted_at

            # One tick of the new supervisor gives up the wait, which began before the restart.
            await stack.supervisor.tick()
            first = [(e.type, e.data) for e in await stack.supervisor.store.read_stream(job_id)
                     if e.data.get("attempt") == 1]
            stack.start_loop()
            job = await stack.wait_settled(job_id)
        finally:
            await stop_supervisor(stack)

        assert len(preempted) == 1
        assert rebuilt_at == preempted[0].recorded_at  # the wait's start, from the journal
        destroys = [data for kind, data in first if kind == "InstanceDestroyRequested"]
        assert len(destroys) == 1
        assert destroys[0]["instance_id"] == instance_id
        assert destroys[0]["reason"].startswith("preempted:")
        assert "JobResumed" not in [kind for kind, _ in first]
        assert job["state"] == "done"
        assert job["attempt"] == 2
        ledger = stack.emulator.ledger()
        assert len(ledger) == 2
        assert all(row["destroyed_at"] is not None for row in ledger)
