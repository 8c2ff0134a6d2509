"""Rebid after an outbid: min_bid plus the margin, capped so bid plus storage fits max_dph."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpujobs.settings import load_settings
from tests.e2e.harness import live_stack, wait_for_checkpoint

pytestmark = pytest.mark.timeout(180)

REBID = "PUT /instances/bid_price/{id}/"
MAX_DPH = 0.40
MARGIN = 0.2
PROFILE = f"""\
profiles:
  spot:
    gpu_name: RTX_4090
    num_gpus: 1
    max_dph: {MAX_DPH}
    reliability_min: 0.90
    max_duration_hours: 2
    interruptible: true
    bid_margin: {MARGIN}
    on_preemption: rebid
    resume_wait_s: 60
"""


async def outbid_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    min_bid: float | None) -> tuple[dict, list, dict, float]:
    """Run a job, raise its offer's min_bid to `min_bid` (None keeps it), then outbid it.

    Returns the settled job, its events, the emulator's view (ledger, the first instance's
    bid before and after) and the min_bid in force when it was outbid.
    """
    config = tmp_path / "config"
    config.mkdir()
    (config / "gpu_profiles.yaml").write_text(PROFILE)
    monkeypatch.setenv("GPUJOBS_CONFIG_DIR", str(config))
    home = tmp_path / "home"
    async with live_stack(home, config_dirs=load_settings(home=home).config_dirs) as stack:
        stack.start_loop()
        job_id = await stack.submit(profile="spot", total_steps=300, step_delay_s=0.01)
        instance_id = await wait_for_checkpoint(stack, job_id)
        emulated = stack.emulator.fleet.instances[instance_id]
        if min_bid is not None:
            emulated.offer["min_bid"] = min_bid  # the market moved: bids must now reach this
        floor = float(emulated.offer["min_bid"])
        first_bid = emulated.price
        await stack.emulator.preempt(instance_id, sigterm=True, grace_s=2.0)
        job = await stack.wait_settled(job_id)
        events = [(e.type, e.data.get("attempt"))
                  for e in await stack.supervisor.store.read_stream(job_id)]
        return job, events, {"ledger": stack.emulator.ledger(),
                             "first_bid": first_bid, "bid": emulated.price,
                             "storage_dph": emulated.disk_dph,
                             "rebids": stack.emulator.request_count(REBID)}, floor


async def test_rebid_adds_the_margin(tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    job, events, emulated, floor = await outbid_at(tmp_path, monkeypatch, 0.30)
    assert job["state"] == "done"
    assert len(emulated["ledger"]) == 1
    assert ("JobResumed", 1) in events
    assert emulated["rebids"] == 1
    assert emulated["first_bid"] != pytest.approx(0.36)
    assert emulated["bid"] == pytest.approx(0.36)  # min_bid $0.30 plus 20%


async def test_rebid_is_capped_at_max_dph(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    job, events, emulated, floor = await outbid_at(tmp_path, monkeypatch, 0.38)
    assert floor * (1 + MARGIN) > MAX_DPH
    assert job["state"] == "done"
    assert len(emulated["ledger"]) == 1
    assert ("JobResumed", 1) in events
    assert emulated["rebids"] == 1
    # The bid leaves room for storage: bid plus storage stays within max_dph, to 4 decimals.
    room = MAX_DPH - emulated["storage_dph"]
    assert room - 0.0001 < emulated["bid"] <= room


async def test_min_bid_above_cap_migrates(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    job, events, emulated, floor = await outbid_at(tmp_path, monkeypatch, 0.45)
    assert floor > MAX_DPH
    assert job["state"] == "done"
    assert job["attempt"] == 2
    first, second = emulated["ledger"]
    assert first["destroyed_at"] is not None
    assert emulated["rebids"] == 0  # no bid above the cap was sent
    assert emulated["bid"] == emulated["first_bid"]
    assert second["dph_total"] <= MAX_DPH
