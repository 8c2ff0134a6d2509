"""Fault plans: parsing, validation, and each kind firing through a running emulator."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from gpujobs.emulator import Emulator, FaultPlan, FaultPlanError
from gpujobs.emulator.faults import FaultState
from gpujobs.vast import errors

from emu_helpers import cheap_offer, client_for, wait_for_status


def test_plan_from_yaml_file(tmp_path):
    path = tmp_path / "faults.yaml"
    path.write_text(
        "rules:\n"
        "  - {kind: preempt, after_s: 5, sigterm: true, grace_s: 3, instance: first}\n"
        "  - {kind: burst_429, endpoint: 'PUT /asks/{id}/', count: 2}\n"
        "  - {kind: offer_vanishes, probability: 0.25}\n"
    )
    plan = FaultPlan.from_file(path)
    assert [rule.kind for rule in plan.rules] == ["preempt", "burst_429", "offer_vanishes"]
    assert plan.rules[0].grace_s == 3
    assert plan.rules[1].count == 2
    assert plan.rules[2].probability == 0.25


def test_plan_from_json_list_file(tmp_path):
    path = tmp_path / "faults.json"
    path.write_text(json.dumps([{"kind": "offline", "after_s": 1, "instance": 12345}]))
    plan = FaultPlan.from_file(path)
    assert plan.rules[0].instance == 12345
    assert FaultPlan.from_data(json.loads(plan.to_json())) == plan


@pytest.mark.parametrize("rule, message", [
    ({"kind": "explode"}, "kind 'explode' is invalid"),
    ({"kind": "preempt", "after_s": -1}, "after_s must be a number >= 0"),
    ({"kind": "burst_429", "count": 0}, "count must be an integer >= 1"),
    ({"kind": "preempt", "when": 3}, "unknown field(s) when"),
    ({"kind": "offer_vanishes", "probability": 2}, "probability must be between 0 and 1"),
    ({"kind": "malformed", "form": "xml"}, "form must be 'html' or 'truncated'"),
    ({"kind": "preempt", "instance": "last"}, "instance must be 'first', 'all'"),
    ({"kind": "burst_5xx", "status": 404}, "status must be 5xx"),
])
def test_invalid_rules_named(rule, message):
    with pytest.raises(FaultPlanError) as caught:
        FaultPlan.from_data({"rules": [{"kind": "slow"}, rule]})
    assert "fault rule 1" in str(caught.value)
    assert message in str(caught.value)


def test_invalid_file_names_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rules: [\n")
    with pytest.raises(FaultPlanError, match="bad.yaml"):
        FaultPlan.from_file(path)
    with pytest.raises(FaultPlanError, match="cannot read"):
        FaultPlan.from_file(tmp_path / "missing.yaml")


def test_vanishing_probability_deterministic_per_seed():
    plan = FaultPlan.from_data([{"kind": "offer_vanishes", "probability": 0.5}])
    draws = [[FaultState(plan, seed).offer_vanishes() for _ in range(1)] for seed in range(20)]
    again = [[FaultState(plan, seed).offer_vanishes() for _ in range(1)] for seed in range(20)]
    assert draws == again
    assert {True, False} == {draw[0] for draw in draws}


def test_http_fault_counts():
    state = FaultState(FaultPlan.from_data([
        {"kind": "burst_5xx", "endpoint": "bundles", "count": 2, "status": 504},
        {"kind": "slow", "endpoint": "POST /bundles/", "delay_s": 0.5},
    ]), seed=0)
    faults = [state.http_fault("POST /bundles/") for _ in range(3)]
    assert [fault.status for fault in faults] == [504, 504, None]
    assert [fault.delay_s for fault in faults] == [0.5, 0.5, 0.5]
    assert state.http_fault("GET /api/v1/instances/").status is None


def test_http_fault_probability_seeded():
    plan = FaultPlan.from_data([{"kind": "burst_5xx", "probability": 0.3, "status": 502}])
    states = [FaultState(plan, seed) for seed in (1, 1, 2)]
    runs = [[state.http_fault("POST /bundles/").status for _ in range(200)] for state in states]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert set(runs[0]) == {502, None}
    assert 30 <= runs[0].count(502) <= 90


def test_http_fault_probability_capped_by_count():
    plan = FaultPlan.from_data([{"kind": "disconnect", "probability": 1.0, "count": 2}])
    state = FaultState(plan, seed=0)
    assert [state.http_fault("GET /charges/").disconnect for _ in range(4)] == [
        True, True, False, False]


def test_rate_limit_body_validated():
    with pytest.raises(FaultPlanError, match="body must be one of text, detail, json"):
        FaultPlan.from_data([{"kind": "burst_429", "body": "xml"}])


async def started(tmp_path, rules, **options) -> Emulator:
    emu = Emulator(seed=8, loading_s=0.2, rate_limits=False, workdir=tmp_path / "emu",
                   faults=FaultPlan.from_data(rules), **options)
    await emu.start()
    return emu


async def test_timed_preempt_first_instance(tmp_path):
    emu = await started(tmp_path, [{"kind": "preempt", "after_s": 0.2, "sigterm": True,
                                    "grace_s": 1.0, "instance": "first"}])
    try:
        async with client_for(emu) as vast:
            first = await vast.create_instance(await cheap_offer(vast), image="busybox",
                                               onstart="exec sleep 60")
            second = await vast.create_instance(await cheap_offer(vast), image="busybox",
                                                onstart="exec sleep 60")
            outbid = await wait_for_status(vast, first, "stopped")
            assert outbid.is_outbid
            await wait_for_status(vast, second, "running")
            assert not (await vast.show_instance(second)).is_outbid
    finally:
        await emu.stop()


async def test_timed_offline_all(tmp_path):
    emu = await started(tmp_path, [{"kind": "offline", "after_s": 0.1, "instance": "all"}])
    try:
        async with client_for(emu) as vast:
            ids = [await vast.create_instance(await cheap_offer(vast), image="busybox",
                                              onstart="exec sleep 60")
                   for _ in range(2)]
            dropped = [await wait_for_status(vast, instance_id, "offline")
                       for instance_id in ids]
        assert [inst.status_msg for inst in dropped] == ["host is offline"] * 2
        assert all(inst.host_lost for inst in dropped)
        for instance_id in ids:
            inst = emu.fleet.get_live(instance_id)
            assert inst.process is None, "the host drop kills the container's processes"
            assert inst.meter.gpu_dph == 0.0, "a dropped host bills storage only"
        assert [entry["status"] for entry in emu.ledger()] == ["offline", "offline"]
    finally:
        await emu.stop()


async def test_timed_unknown_first(tmp_path):
    emu = await started(tmp_path, [{"kind": "unknown", "after_s": 0.1, "instance": "first"}])
    try:
        async with client_for(emu) as vast:
            first = await vast.create_instance(await cheap_offer(vast), image="busybox",
                                               onstart="exec sleep 60")
            second = await vast.create_instance(await cheap_offer(vast), image="busybox",
                                                onstart="exec sleep 60")
            lost = await wait_for_status(vast, first, "unknown")
            await wait_for_status(vast, second, "running")
        assert lost.host_lost
        assert emu.fleet.get_live(first).meter.gpu_dph == 0.0
        assert emu.fleet.get_live(second).meter.gpu_dph > 0.0
    finally:
        await emu.stop()


async def test_slow_loading(tmp_path):
    emu = await started(tmp_path, [{"kind": "slow_loading", "extra_s": 1.0,
                                    "instance": "first"}])
    try:
        async with client_for(emu) as vast:
            slow = await vast.create_instance(await cheap_offer(vast), image="busybox")
            fast = await vast.create_instance(await cheap_offer(vast), image="busybox")
            await wait_for_status(vast, fast, "running")
            assert (await vast.show_instance(slow)).actual_status in (None, "loading")
            await wait_for_status(vast, slow, "running")
    finally:
        await emu.stop()


async def test_burst_on_one_endpoint_only(tmp_path):
    emu = await started(tmp_path, [{"kind": "burst_5xx", "endpoint": "PUT /asks/{id}/",
                                    "count": 1}])
    try:
        async with client_for(emu, max_attempts=2) as vast:
            offer_id = await cheap_offer(vast)
            with pytest.raises(errors.ServerError):
                await vast.create_instance(offer_id, image="busybox")
            assert await vast.create_instance(offer_id, image="busybox") > 0
            assert await vast.search_offers(limit=1)
        assert emu.request_count("PUT /asks/{id}/") == 2
        assert emu.request_count("POST /bundles/") == 2
    finally:
        await emu.stop()


@pytest.mark.parametrize("body, content_type, expected", [
    ("text", "text/plain", "API requests too frequent"),
    ("detail", "application/json", {"detail": "API requests too frequent"}),
    ("json", "application/json", {"success": False, "error": "rate_limit_exceeded",
                                  "msg": "API requests too frequent"}),
])
async def test_rate_limit_body_forms(tmp_path, body, content_type, expected):
    emu = await started(tmp_path, [{"kind": "burst_429", "endpoint": "POST /bundles/",
                                    "body": body, "retry_after_s": 2}])
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(emu.url + "/api/v0/bundles/", json={}) as response:
                text = await response.text()
        assert response.status == 429
        assert response.headers["Content-Type"].startswith(content_type)
        assert response.headers["Retry-After"] == "2"
        assert (text if body == "text" else json.loads(text)) == expected
    finally:
        await emu.stop()


async def test_disconnect_after_handler(tmp_path):
    emu = await started(tmp_path, [{"kind": "disconnect", "endpoint": "PUT /asks/{id}/"}])
    try:
        async with client_for(emu) as vast:
            offer_id = await cheap_offer(vast)
        # A bare socket, because aiohttp would resend a PUT after the disconnect.
        body = json.dumps({"image": "busybox"}).encode()
        host, port = emu.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"PUT /api/v0/asks/{offer_id}/ HTTP/1.1\r\nHost: {host}\r\n"
                     f"Authorization: Bearer {emu.api_key}\r\n"
                     "Content-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        assert reply == b"", "the connection closes without a status line"
        assert len(emu.live_instance_ids()) == 1, "the create took effect before the drop"
    finally:
        await emu.stop()
