"""Control routes under /_emulator/ and the standalone server process."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import aiohttp

from gpujobs.vast import VastClient

from emu_helpers import cheap_offer, raw, wait_for_status


async def test_control_routes_need_key(emulator):
    status, _, _ = await raw(emulator, "GET", "/_emulator/ledger", key=None)
    assert status == 403
    status, _, _ = await raw(emulator, "GET", "/_emulator/ledger", key="wrong")
    assert status == 401


async def test_http_preempt_offline_and_ledger(emulator, vast):
    first = await vast.create_instance(await cheap_offer(vast), image="busybox",
                                       onstart="exec sleep 60", label="a")
    second = await vast.create_instance(await cheap_offer(vast), image="busybox",
                                        onstart="exec sleep 60", label="b")
    await wait_for_status(vast, first, "running")
    await wait_for_status(vast, second, "running")

    status, _, body = await raw(emulator, "POST", f"/_emulator/instances/{first}/preempt",
                                json={"sigterm": True, "grace_s": 0.5})
    assert (status, body["success"]) == (200, True)
    assert (await vast.show_instance(first)).is_outbid
    status, _, _ = await raw(emulator, "POST", f"/_emulator/instances/{second}/offline")
    assert status == 200
    assert (await vast.show_instance(second)).actual_status == "offline"
    status, _, _ = await raw(emulator, "POST", "/_emulator/instances/1/offline")
    assert status == 404

    status, _, body = await raw(emulator, "GET", "/_emulator/ledger")
    assert status == 200
    by_id = {entry["id"]: entry for entry in body["ledger"]}
    assert by_id[first]["status"] == "stopped"
    assert by_id[second]["status"] == "offline"
    assert by_id[first]["label"] == "a"
    assert {"offer_id", "machine_id", "host_id", "dph_total", "created_at", "destroyed_at",
            "cost_usd"} <= set(by_id[first])
    assert body["total_charges_usd"] > 0


async def test_http_replace_faults(emulator, vast):
    status, _, body = await raw(emulator, "POST", "/_emulator/faults", json={
        "rules": [{"kind": "burst_5xx", "endpoint": "POST /bundles/", "count": 1,
                   "status": 500}]})
    assert (status, body["rules"]) == (200, 1)
    status, _, _ = await raw(emulator, "POST", "/api/v0/bundles/", json={})
    assert status == 500
    status, _, body = await raw(emulator, "POST", "/_emulator/faults",
                                json={"rules": [{"kind": "nonsense"}]})
    assert status == 400
    assert "nonsense" in body["msg"]


async def test_standalone_server_prints_url_and_key(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "VAST_API_KEY"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gpujobs.emulator", "--port", "0", "--seed", "3",
        "--loading-s", "0.1", stdout=asyncio.subprocess.PIPE, env=env, cwd=tmp_path,
    )
    try:
        lines = [(await asyncio.wait_for(process.stdout.readline(), 30)).decode()
                 for _ in range(3)]
        assert lines[0].startswith("Vast.ai emulator listening on http://127.0.0.1:")
        url = lines[1].strip().removeprefix("export VAST_URL=")
        key = lines[2].strip().removeprefix("export VAST_API_KEY=")
        assert len(key) == 64
        async with VastClient(key, base_url=url) as vast:
            assert "credit" in await vast.current_user()
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/api/v0/users/current/") as response:
                assert response.status == 403
    finally:
        process.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(process.stdout.read(), 30)
        code = await process.wait()
    assert code == 0
    assert b"Vast.ai emulator stopped" in rest


async def test_standalone_given_key_not_printed(tmp_path):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gpujobs.emulator", "--api-key", "chosen-key-123",
        stdout=asyncio.subprocess.PIPE, cwd=tmp_path,
    )
    first = await asyncio.wait_for(process.stdout.readline(), 30)
    second = await asyncio.wait_for(process.stdout.readline(), 30)
    process.send_signal(signal.SIGINT)
    rest = await asyncio.wait_for(process.stdout.read(), 30)
    assert await process.wait() == 0
    assert b"chosen-key-123" not in first + second + rest
    assert second.startswith(b"export VAST_URL=")


async def test_http_unknown_host(emulator, vast):
    instance_id = await vast.create_instance(await cheap_offer(vast), image="busybox",
                                             onstart="exec sleep 60")
    await wait_for_status(vast, instance_id, "running")

    status, _, body = await raw(emulator, "POST", f"/_emulator/instances/{instance_id}/unknown")

    assert (status, body["success"]) == (200, True)
    inst = await vast.show_instance(instance_id)
    assert inst.actual_status == "unknown"
    assert inst.host_lost
    status, _, _ = await raw(emulator, "POST", "/_emulator/instances/1/unknown")
    assert status == 404
