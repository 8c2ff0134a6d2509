"""One contract for every Vast.ai backend: the emulator always, the real API on request.

The real API runs only with VAST_API_KEY and GPUJOBS_LIVE_VAST=1 (read-only calls), and the
create test also needs GPUJOBS_LIVE_VAST_CREATE=1 because it rents a machine and costs money.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from gpujobs.emulator import Emulator
from gpujobs.vast import Instance, Offer, VastClient, errors

from vast_helpers import fast_client

LIVE = os.environ.get("GPUJOBS_LIVE_VAST") == "1" and bool(os.environ.get("VAST_API_KEY"))
LIVE_CREATE = LIVE and os.environ.get("GPUJOBS_LIVE_VAST_CREATE") == "1"
LIVE_REASON = "real Vast.ai API needs VAST_API_KEY and GPUJOBS_LIVE_VAST=1"


@pytest.fixture(params=[
    "emulator",
    pytest.param("live", marks=[pytest.mark.live_vast,
                                pytest.mark.skipif(not LIVE, reason=LIVE_REASON)]),
])
async def backend(request, tmp_path):
    """Yield (client, kind); the live client paces at the real API's default intervals."""
    if request.param == "live":
        vast = VastClient(os.environ["VAST_API_KEY"], base_url=os.environ.get("VAST_URL"))
        yield vast, "live"
        await vast.close()
        return
    emu = Emulator(seed=3, loading_s=0.2, rate_limits=False, workdir=tmp_path / "emu")
    await emu.start()
    vast = fast_client(emu)
    yield vast, "emulator"
    await vast.close()
    await emu.stop()


async def test_search_filters_and_limit(backend):
    vast, _ = backend
    offers = await vast.search_offers("num_gpus=1", order="dph_total", limit=5)
    assert 1 <= len(offers) <= 5
    assert all(isinstance(offer, Offer) for offer in offers)
    assert all(offer.num_gpus == 1 for offer in offers)
    prices = [offer.dph_total for offer in offers]
    assert prices == sorted(prices)


async def test_search_gpu_name_has_spaces(backend):
    vast, _ = backend
    offers = await vast.search_offers({"gpu_name": {"eq": "RTX 4090"}, "num_gpus": {"eq": "1"},
                                       "rentable": {"eq": True}}, limit=3)
    assert offers, "expected at least one 1x RTX 4090 offer"
    assert {offer.gpu_name for offer in offers} == {"RTX 4090"}


async def test_search_interruptible_has_min_bid(backend):
    vast, _ = backend
    offers = await vast.search_offers("num_gpus=1", offer_type="interruptible", limit=5)
    assert offers
    assert all(offer.min_bid is not None for offer in offers)


async def test_search_rejects_unknown_offer_type(backend):
    vast, _ = backend
    with pytest.raises(ValueError, match="offer_type"):
        await vast.search_offers(offer_type="spot")


async def test_list_instances_returns_records(backend):
    vast, _ = backend
    instances = await vast.list_instances()
    assert isinstance(instances, list)
    assert all(isinstance(inst, Instance) for inst in instances)


async def test_show_unknown_instance_is_none(backend):
    vast, _ = backend
    assert await vast.show_instance(1) is None


async def test_current_user_hides_api_key(backend):
    vast, _ = backend
    user = await vast.current_user()
    assert "api_key" not in user
    assert "credit" in user or "balance" in user


async def test_charges_returns_list(backend):
    vast, _ = backend
    now = time.time()
    charges = await vast.charges(start=now - 86400, end=now)
    assert isinstance(charges, list)


async def test_create_run_logs_destroy(backend):
    vast, kind = backend
    if kind == "live" and not LIVE_CREATE:
        pytest.skip("renting a real machine needs GPUJOBS_LIVE_VAST_CREATE=1")
    offers = await vast.search_offers("num_gpus=1 dph<=0.5", order="dph_total", limit=1)
    instance_id = await vast.create_instance(
        offers[0].id, image="python:3.11-slim", label="gpujobs-contract",
        onstart="echo contract-marker; sleep 600", disk_gb=10,
    )
    try:
        inst = await _wait_for_status(vast, instance_id, {"running"}, 600 if kind == "live" else 20)
        assert inst.label == "gpujobs-contract"
        assert inst.dph_total is not None and inst.dph_total > 0
        logs = await _wait_for_log(vast, instance_id, "contract-marker")
        assert "contract-marker" in logs
        listed = await vast.list_instances(label="gpujobs-contract")
        assert instance_id in [item.id for item in listed]
    finally:
        await vast.destroy_instance(instance_id)
    assert await _wait_for_gone(vast, instance_id)
    with pytest.raises(errors.InstanceNotFound):
        await vast.destroy_instance(instance_id)


async def _wait_for_status(vast, instance_id, expected, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        inst = await vast.show_instance(instance_id)
        if inst is not None and inst.actual_status in expected:
            return inst
        await asyncio.sleep(0.1)
    raise AssertionError(f"instance {instance_id} never reached {expected}")


async def _wait_for_log(vast, instance_id, text, attempts=30):
    logs = ""
    for _ in range(attempts):
        logs = await vast.request_logs(instance_id, tail=100, poll_interval_s=0.1)
        if text in logs:
            return logs
        await asyncio.sleep(0.2)
    return logs


async def _wait_for_gone(vast, instance_id, attempts=50):
    for _ in range(attempts):
        if await vast.show_instance(instance_id) is None:
            return True
        await asyncio.sleep(0.2)
    return False
