"""Instance calls through the client against the emulator: labels, host drops, charges."""

from __future__ import annotations

import asyncio
import time

from gpujobs.emulator import Emulator, FaultPlan
from gpujobs.supervisor.watch import _loss_reason
from gpujobs.vast import VastClient

from vast_helpers import cheap_offer_ids, fast_client


async def wait_for_status(vast: VastClient, instance_id: int, status: str, polls: int = 200):
    for _ in range(polls):
        inst = await vast.show_instance(instance_id)
        if inst is not None and inst.actual_status == status:
            return inst
        await asyncio.sleep(0.05)
    raise AssertionError(f"instance {instance_id} never reached {status!r}")


async def test_label_instance_relabels(emulator, client):
    [offer_id] = await cheap_offer_ids(client, 1)
    instance_id = await client.create_instance(offer_id, image="busybox", label="job:1:1")

    await client.label_instance(instance_id, "job:1:retired")

    assert emulator.request_count("PUT /instances/{id}/") == 1
    assert [inst.id for inst in await client.list_instances(label="job:1:retired")] == [
        instance_id]
    assert await client.list_instances(label="job:1:1") == []
    assert (await client.show_instance(instance_id)).label == "job:1:retired"


async def test_charges_follow_next_token(emulator, client):
    offer_ids = await cheap_offer_ids(client, 3)
    instance_ids = [await client.create_instance(offer_id, image="busybox")
                    for offer_id in offer_ids]
    await client.destroy_instance(instance_ids[0])

    now = time.time()
    charges = await client.charges(start=now - 3600, end=now + 3600, page_size=1)

    assert emulator.request_count("GET /charges/") == 3
    assert sorted(charge["metadata"]["instance_id"] for charge in charges) == sorted(
        instance_ids)
    assert all(charge["type"] == "instance" for charge in charges)


async def test_unknown_host_reads_as_lost(tmp_path):
    emu = Emulator(seed=9, loading_s=0.1, workdir=tmp_path / "emu", rate_limits=False,
                   faults=FaultPlan.from_data(
                       [{"kind": "unknown", "after_s": 0.1, "instance": "first"}]))
    await emu.start()
    try:
        async with fast_client(emu) as vast:
            first, second = [await vast.create_instance(offer_id, image="busybox",
                                                        onstart="exec sleep 60")
                             for offer_id in await cheap_offer_ids(vast, 2)]
            lost = await wait_for_status(vast, first, "unknown")
            healthy = await wait_for_status(vast, second, "running")
            listed = {inst.id: inst for inst in await vast.list_instances()}
        assert lost.host_lost
        assert lost.status_msg == "no heartbeat from the host"
        assert listed[first].actual_status == "unknown"
        assert not healthy.host_lost
        assert _loss_reason(lost) == "unknown"
        assert _loss_reason(healthy) is None
    finally:
        await emu.stop()


async def test_offline_host_reads_as_lost(emulator, client):
    [offer_id] = await cheap_offer_ids(client, 1)
    instance_id = await client.create_instance(offer_id, image="busybox")
    await wait_for_status(client, instance_id, "running")

    await emulator.set_offline(instance_id)

    inst = await client.show_instance(instance_id)
    assert inst.actual_status == "offline"
    assert inst.host_lost
    assert _loss_reason(inst) == "offline"
