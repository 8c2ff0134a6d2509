"""The waiting queue: priorities, concurrency limits, and the reasons `status` shows."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gpujobs.jobs import list_jobs
from gpujobs.settings import load_settings
from tests.e2e.harness import live_stack

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
