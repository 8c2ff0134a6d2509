"""The waiting queue: priorities, concurrency limits, and the reasons `status` shows."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from gpujobs.jobs import list_jobs
from gpujobs.projections import parse_label
from gpujobs.settings import load_settings
from tests.e2e.harness import live_stack
from tests.e2e.torture import child_env, run_cli

pytestmark = pytest.mark.timeout(180)


def write_config(folder: Path, limits: str, profiles: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "limits.yaml").write_text(limits)
    if profiles is not None:
        (folder / "gpu_profiles.yaml").write_text(profiles)
    return folder


async def test_limit_serves_jobs_by_priority(tmp_path: Path, monkeypatch) -> None:
    config = write_config(tmp_path / "config", "max_instances: 1\n")
    monkeypatch.setenv("GPUJOBS_CONFIG_DIR", str(config))
    home = tmp_path / "home"
    async with live_stack(home, config_dirs=load_settings(home=home).config_dirs) as stack:
        low = await stack.submit(name="low", priority=0, total_steps=120)
        high = await stack.submit(name="high", priority=5, total_steps=120)
        mid = await stack.submit(name="mid", priority=2, total_steps=120)
        stack.start_loop()
        await stack.wait_for(lambda: stack.state(high) == "running", what="high running")
        await asyncio.sleep(0.6)  # let a tick publish the queue
        statuses = {s.job_id: s for s in await list_jobs(stack.settings)}
        assert statuses[mid].queue_position == 1
        assert statuses[low].queue_position == 2
        assert "concurrency limit: 1/1 instances alive" in statuses[mid].wait_reason

        max_alive = 0
        while not all(stack.state(j) == "done" for j in (low, high, mid)):
            max_alive = max(max_alive, len(stack.emulator.live_instance_ids()))
            await asyncio.sleep(0.05)
        assert max_alive == 1
        order = sorted(stack.emulator.ledger(), key=lambda row: row["created_at"])
        assert [row["label"].split(":")[1].split("-")[0] for row in order] == ["high", "mid", "low"]


NO_FIT_PROFILE = """\
profiles:
  dev-test:
    gpu_name: RTX_4090
    num_gpus: 1
    max_dph: 0.01
    reliability_min: 0.90
    max_duration_hours: 2
"""


async def test_no_fitting_offer_is_shown_as_reason(tmp_path: Path, monkeypatch) -> None:
    config = write_config(tmp_path / "config", "max_instances: 5\n", NO_FIT_PROFILE)
    monkeypatch.setenv("GPUJOBS_CONFIG_DIR", str(config))
    home = tmp_path / "home"
    async with live_stack(home, config_dirs=load_settings(home=home).config_dirs) as stack:
        job_id = await stack.submit()
        stack.start_loop()
        await asyncio.sleep(1.5)
        [status] = await list_jobs(stack.settings, job_id)
        assert status.state == "queued"
        assert status.queue_position == 1
        assert status.wait_reason.startswith("no offer fits profile dev-test")
        assert "<= $0.01/h" in status.wait_reason
        assert stack.emulator.ledger() == []


async def published_status(stack, job_id: str):
    """Return the job's status once the supervisor has published a reason for its wait."""
    while True:
        [status] = await list_jobs(stack.settings, job_id)
        if status.wait_reason is not None:
            return status
        # None: the supervisor has not folded the submission yet.
        assert stack.state(job_id) in (None, "queued"), (
            f"job {job_id} left the queue without a reason")
        await asyncio.sleep(0.1)


def created_order(stack, job_ids: dict[str, str]) -> list[str]:
    """Names of the jobs in the order the emulator created their instances."""
    names = {job_id: name for name, job_id in job_ids.items()}
    rows = sorted(stack.emulator.ledger(), key=lambda row: (row["created_at"], row["id"]))
    return [names[parse_label(row["label"])[0]] for row in rows]


async def test_team_limit_lets_others_pass(tmp_path: Path, monkeypatch) -> None:
    config = write_config(tmp_path / "config", "max_instances: 5\nteams:\n  vision: 1\n")
    monkeypatch.setenv("GPUJOBS_CONFIG_DIR", str(config))
    home = tmp_path / "home"
    async with live_stack(home, config_dirs=load_settings(home=home).config_dirs) as stack:
        job_ids = {}
        for name, team in (("vision1", "vision"), ("vision2", "vision"), ("speech1", "speech")):
            job_ids[name] = await stack.submit(name=name, team=team, total_steps=400)
        stack.start_loop()
        waiting = await published_status(stack, job_ids["vision2"])
        assert waiting.state == "queued"
        assert waiting.queue_position == 1
        assert waiting.wait_reason == "concurrency limit: team vision has 1/1 instances alive"

        max_vision_alive = 0
        while not all(stack.state(job_id) == "done" for job_id in job_ids.values()):
            live = set(stack.emulator.live_instance_ids())
            vision_alive = [row for row in stack.emulator.ledger()
                            if row["id"] in live and "vision" in row["label"]]
            max_vision_alive = max(max_vision_alive, len(vision_alive))
            await asyncio.sleep(0.05)
        assert max_vision_alive == 1
        # speech1 came last but was not held behind vision2, whose team was at its limit.
        assert created_order(stack, job_ids) == ["vision1", "speech1", "vision2"]


async def test_equal_priority_served_in_order(tmp_path: Path, monkeypatch) -> None:
    config = write_config(tmp_path / "config", "max_instances: 1\n")
    monkeypatch.setenv("GPUJOBS_CONFIG_DIR", str(config))
    home = tmp_path / "home"
    async with live_stack(home, config_dirs=load_settings(home=home).config_dirs) as stack:
        # Names sort against the order of submission, so only the submission time orders them.
        job_ids = {}
        for name in ("zulu", "yankee", "xray"):
            job_ids[name] = await stack.submit(name=name, priority=3, total_steps=100)
        stack.start_loop()
        second = await published_status(stack, job_ids["yankee"])
        [third] = await list_jobs(stack.settings, job_ids["xray"])
        assert second.queue_position == 1
        assert third.queue_position == 2
        assert stack.state(job_ids["zulu"]) != "queued"

        for job_id in job_ids.values():
            job = await stack.wait_settled(job_id)
            assert job["state"] == "done"
        assert created_order(stack, job_ids) == ["zulu", "yankee", "xray"]


async def test_backoff_reason_in_status_command(tmp_path: Path, monkeypatch) -> None:
    config = write_config(tmp_path / "config", "max_instances: 5\n")
    monkeypatch.setenv("GPUJOBS_CONFIG_DIR", str(config))
    home = tmp_path / "home"
    async with live_stack(home, config_dirs=load_settings(home=home).config_dirs) as stack:
        # The worker exits before its first report, so the job goes back to the queue and
        # waits a few seconds before its next attempt.
        job_id = await stack.submit(command="exit 3")
        stack.start_loop()
        env = child_env(home, stack.emulator, config)
        seen = None
        while seen is None and stack.state(job_id) != "failed":
            code, output = await run_cli(env, "status", job_id, "--json")
            assert code == 0, output
            [status] = json.loads(output)
            if status["wait_reason"] is not None:
                seen = status
        assert seen is not None, "status never showed the job waiting"
        assert seen["state"] == "queued"
        assert seen["queue_position"] == 1
        assert seen["wait_reason"].startswith("backoff after: worker_error:")
        assert "exited before its first report" in seen["wait_reason"]
