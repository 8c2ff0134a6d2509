"""Create is not idempotent: attempts counted at the emulator for each kind of failure.

A create is retried only when the API surely did not act on it. After a lost reply the
instance may exist, so the client raises at once and the caller finds it by label.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from gpujobs.emulator import Emulator, FaultPlan
from gpujobs.vast import VastClient, errors

from vast_helpers import cheapest_offer_id, fast_client

CREATE = "PUT /asks/{id}/"


async def started(tmp_path, rules) -> Emulator:
    emu = Emulator(seed=13, loading_s=0.2, workdir=tmp_path / "emu", rate_limits=False,
                   faults=FaultPlan.from_data(rules))
    await emu.start()
    return emu


def create_retries(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.levelno == logging.WARNING
            and record.getMessage().startswith(f"retrying {CREATE}")]


async def test_create_429_retried(tmp_path, caplog):
    emu = await started(tmp_path, [{"kind": "burst_429", "endpoint": CREATE, "count": 2}])
    try:
        async with fast_client(emu, max_attempts=5) as vast:
            instance_id = await vast.create_instance(await cheapest_offer_id(vast),
                                                     image="busybox", label="job:1")
        assert emu.request_count(CREATE) == 3
        assert len(create_retries(caplog)) == 2
        assert emu.live_instance_ids() == [instance_id]
    finally:
        await emu.stop()


async def test_create_refused_connection_retried(tmp_path, caplog):
    emu = await started(tmp_path, [])
    url = emu.url
    await emu.stop()
    async with VastClient("key", base_url=url, max_attempts=3, backoff_base_s=0.001) as vast:
        with pytest.raises(errors.ConnectionFailed) as caught:
            await vast.create_instance(123, image="busybox")
    assert "after 3 attempts" in str(caught.value)
    assert len(create_retries(caplog)) == 2


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_create_server_error_not_retried(tmp_path, caplog, status):
    emu = await started(tmp_path, [{"kind": "burst_5xx", "endpoint": CREATE, "count": 1,
                                    "status": status}])
    try:
        async with fast_client(emu, max_attempts=5) as vast:
            with pytest.raises(errors.ServerError) as caught:
                await vast.create_instance(await cheapest_offer_id(vast), image="busybox")
        assert emu.request_count(CREATE) == 1
        assert caught.value.status == status
        assert "not retried" in str(caught.value)
        assert create_retries(caplog) == []
    finally:
        await emu.stop()


async def test_create_timeout_not_retried(tmp_path, caplog):
    emu = await started(tmp_path, [{"kind": "slow", "endpoint": CREATE, "delay_s": 1.0,
                                    "count": 1}])
    try:
        async with fast_client(emu, timeout_s=0.3, max_attempts=5) as vast:
            with pytest.raises(errors.ConnectionFailed) as caught:
                await vast.create_instance(await cheapest_offer_id(vast), image="busybox",
                                           label="job:7:1")
            assert emu.request_count(CREATE) == 1
            assert "not retried" in str(caught.value)
            assert create_retries(caplog) == []
            # The server finished the create after the client gave up: the instance exists
            # and the caller adopts it by label.
            adopted = await wait_for_label(vast, "job:7:1")
        assert [inst.id for inst in adopted] == emu.live_instance_ids()
    finally:
        await emu.stop()


async def test_create_lost_reply_not_retried(tmp_path, caplog):
    emu = await started(tmp_path, [{"kind": "disconnect", "endpoint": CREATE, "count": 1}])
    try:
        async with fast_client(emu, max_attempts=5) as vast:
            with pytest.raises(errors.ConnectionFailed) as caught:
                await vast.create_instance(await cheapest_offer_id(vast), image="busybox",
                                           label="job:8:1")
            assert "ServerDisconnectedError" in str(caught.value)
            adopted = await vast.list_instances(label="job:8:1")
        assert emu.request_count(CREATE) == 1
        assert create_retries(caplog) == []
        assert len(adopted) == 1
        assert [inst.id for inst in adopted] == emu.live_instance_ids()
    finally:
        await emu.stop()


async def test_list_lost_reply_retried(tmp_path):
    emu = await started(tmp_path, [{"kind": "disconnect", "endpoint": "GET /api/v1/instances/",
                                    "count": 1}])
    try:
        async with fast_client(emu, max_attempts=5) as vast:
            assert await vast.list_instances() == []
        assert emu.request_count("GET /api/v1/instances/") == 2
    finally:
        await emu.stop()


async def wait_for_label(vast: VastClient, label: str, polls: int = 100) -> list:
    """Poll the instance list until an instance with ``label`` shows up."""
    for _ in range(polls):
        found = await vast.list_instances(label=label)
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"no instance labelled {label!r} after {polls} polls")
