"""Each client error class, triggered through the emulator over real HTTP."""

from __future__ import annotations

import pytest

from gpujobs.emulator import Emulator, FaultPlan
from gpujobs.vast import VastClient, errors

from vast_helpers import cheapest_offer_id, fast_client


async def started(tmp_path, **options) -> Emulator:
    options.setdefault("rate_limits", False)
    emu = Emulator(seed=11, loading_s=0.2, workdir=tmp_path / "emu", **options)
    await emu.start()
    return emu


async def test_missing_key_is_auth_error_403(emulator):
    async with fast_client(emulator, api_key=None) as vast:
        assert await vast.search_offers(limit=1), "search works without a key"
        with pytest.raises(errors.AuthError) as caught:
            await vast.list_instances()
    assert caught.value.status == 403
    assert "This action requires login." in str(caught.value)
    assert caught.value.endpoint == "GET /api/v1/instances/"


async def test_wrong_key_is_auth_error_401(emulator):
    async with fast_client(emulator, api_key="not-the-key") as vast:
        with pytest.raises(errors.AuthError) as caught:
            await vast.current_user()
    assert caught.value.status == 401
    assert "Invalid user key" in str(caught.value)


async def test_rented_offer_is_unavailable(client):
    offer_id = await cheapest_offer_id(client)
    await client.create_instance(offer_id, image="busybox")
    with pytest.raises(errors.OfferUnavailable) as caught:
        await client.create_instance(offer_id, image="busybox")
    assert caught.value.offer_id == offer_id
    assert caught.value.status == 404
    assert "no_such_ask" in str(caught.value)


async def test_rented_offer_gone_410_with_cancel_unavail(client):
    offer_id = await cheapest_offer_id(client)
    await client.create_instance(offer_id, image="busybox")
    with pytest.raises(errors.OfferUnavailable) as caught:
        await client.create_instance(offer_id, image="busybox", cancel_unavail=True)
    assert caught.value.status == 410
    assert caught.value.offer_id == offer_id
    assert "error 410/3907: no_such_ask" in str(caught.value)


async def test_unlisted_offer_404_with_cancel_unavail(client):
    with pytest.raises(errors.OfferUnavailable) as caught:
        await client.create_instance(123, image="busybox", cancel_unavail=True)
    assert caught.value.status == 404
    assert caught.value.offer_id == 123


async def test_vanished_offer_410_with_cancel_unavail(tmp_path):
    emu = await started(tmp_path, faults=FaultPlan.from_data(
        [{"kind": "offer_vanishes", "count": 1}]))
    try:
        async with fast_client(emu) as vast:
            offer_id = await cheapest_offer_id(vast)
            with pytest.raises(errors.OfferUnavailable) as caught:
                await vast.create_instance(offer_id, image="busybox", cancel_unavail=True)
        assert caught.value.status == 410
        assert emu.ledger() == []
    finally:
        await emu.stop()


async def test_vanishing_offer_fault(tmp_path):
    emu = await started(tmp_path, faults=FaultPlan.from_data(
        [{"kind": "offer_vanishes", "count": 1}]))
    try:
        async with fast_client(emu) as vast:
            offer_id = await cheapest_offer_id(vast)
            with pytest.raises(errors.OfferUnavailable):
                await vast.create_instance(offer_id, image="busybox")
            second = await cheapest_offer_id(vast)
            assert second != offer_id
            assert await vast.create_instance(second, image="busybox") > 0
    finally:
        await emu.stop()


async def test_rate_limited_after_attempts(tmp_path):
    emu = await started(tmp_path, rate_limits={"PUT /asks/{id}/": 60.0})
    try:
        async with fast_client(emu, max_attempts=2) as vast:
            offers = await vast.search_offers("num_gpus=1", limit=2)
            await vast.create_instance(offers[0].id, image="busybox")
            with pytest.raises(errors.RateLimited) as caught:
                await vast.create_instance(offers[1].id, image="busybox")
        assert caught.value.status == 429
        assert caught.value.retry_after_s is None
        assert "threshold=60" in str(caught.value)
        assert emu.request_count("PUT /asks/{id}/") == 3
    finally:
        await emu.stop()


@pytest.mark.parametrize("body", ["text", "detail", "json"])
@pytest.mark.parametrize("retry_after_s", [None, 7.0])
async def test_rate_limit_bodies_parsed(tmp_path, body, retry_after_s):
    """The message is the text inside the body, whichever form the body takes."""
    emu = await started(tmp_path, faults=FaultPlan.from_data([
        {"kind": "burst_429", "endpoint": "POST /bundles/", "count": 5, "body": body,
         "retry_after_s": retry_after_s}]))
    try:
        async with fast_client(emu, max_attempts=1) as vast:
            with pytest.raises(errors.RateLimited) as caught:
                await vast.search_offers(limit=1)
        assert caught.value.status == 429
        assert caught.value.retry_after_s == retry_after_s
        assert "HTTP 429: API requests too frequent;" in str(caught.value)
        assert emu.request_count("POST /bundles/") == 1
    finally:
        await emu.stop()


@pytest.mark.parametrize("body", ["text", "detail", "json"])
async def test_rate_limit_bodies_retried(tmp_path, body):
    emu = await started(tmp_path, faults=FaultPlan.from_data([
        {"kind": "burst_429", "endpoint": "POST /bundles/", "count": 2, "body": body,
         "retry_after_s": 0.01}]))
    try:
        async with fast_client(emu, max_attempts=3) as vast:
            assert len(await vast.search_offers(limit=1)) == 1
        assert emu.request_count("POST /bundles/") == 3
    finally:
        await emu.stop()


async def test_search_quota_never_retried(tmp_path):
    emu = await started(tmp_path, faults=FaultPlan.from_data([{"kind": "search_quota"}]))
    try:
        async with fast_client(emu, max_attempts=5) as vast:
            with pytest.raises(errors.SearchQuotaExceeded) as caught:
                await vast.search_offers(limit=1)
        assert emu.request_count("POST /bundles/") == 1
        assert caught.value.status == 429
        assert caught.value.reset_at is not None and caught.value.reset_at > 0
    finally:
        await emu.stop()


async def test_insufficient_credit(tmp_path):
    emu = await started(tmp_path, credit_usd=0.0)
    try:
        async with fast_client(emu) as vast:
            with pytest.raises(errors.InsufficientCredit) as caught:
                await vast.create_instance(await cheapest_offer_id(vast), image="busybox")
        assert caught.value.status == 411
    finally:
        await emu.stop()


async def test_unknown_instance_not_found(client):
    with pytest.raises(errors.InstanceNotFound) as destroyed:
        await client.destroy_instance(123)
    assert destroyed.value.instance_id == 123
    with pytest.raises(errors.InstanceNotFound):
        await client.stop_instance(123)
    with pytest.raises(errors.InstanceNotFound):
        await client.change_bid(123, 0.5)


async def test_server_error_after_attempts(tmp_path):
    emu = await started(tmp_path, faults=FaultPlan.from_data(
        [{"kind": "burst_5xx", "endpoint": "POST /bundles/", "count": 10, "status": 502}]))
    try:
        async with fast_client(emu, max_attempts=3) as vast:
            with pytest.raises(errors.ServerError) as caught:
                await vast.search_offers(limit=1)
        assert caught.value.status == 502
        assert emu.request_count("POST /bundles/") == 3
    finally:
        await emu.stop()


# The instance list has its own decoder; a damaged page must not read as an empty one.
MALFORMED_CALLS = {
    "POST /bundles/": lambda vast: vast.search_offers(limit=1),
    "GET /api/v1/instances/": lambda vast: vast.list_instances_page(),
}


@pytest.mark.parametrize("endpoint", sorted(MALFORMED_CALLS))
@pytest.mark.parametrize("form", ["html", "truncated"])
async def test_malformed_body_is_invalid_response(tmp_path, form, endpoint):
    emu = await started(tmp_path, faults=FaultPlan.from_data(
        [{"kind": "malformed", "endpoint": endpoint, "form": form}]))
    call = MALFORMED_CALLS[endpoint]
    try:
        async with fast_client(emu) as vast:
            with pytest.raises(errors.InvalidResponse) as caught:
                await call(vast)
            await call(vast)  # the fault fires once
        assert caught.value.endpoint == endpoint
        assert caught.value.status == 200
        assert endpoint in str(caught.value)
        assert "HTTP 200" in str(caught.value)
    finally:
        await emu.stop()


async def test_low_bid_creates_stopped_instance(client):
    offers = await client.search_offers("gpu_name=RTX_4090 num_gpus=1", offer_type="bid",
                                        limit=1)
    low_bid = offers[0].min_bid / 2
    with pytest.raises(errors.BidTooLow) as caught:
        await client.create_instance(offers[0].id, image="busybox", price=low_bid)
    instance_id = caught.value.instance_id
    assert instance_id is not None
    inst = await client.show_instance(instance_id)
    assert inst is not None
    assert inst.is_bid is True
    assert inst.actual_status == "stopped"
    assert inst.is_outbid
    await client.destroy_instance(instance_id)
    assert await client.show_instance(instance_id) is None


async def test_invalid_request(client):
    offer_id = await cheapest_offer_id(client)
    with pytest.raises(errors.InvalidRequest) as caught:
        await client.create_instance(offer_id, image="")
    assert caught.value.status == 400
    instance_id = await client.create_instance(offer_id, image="busybox", price=5.0)
    with pytest.raises(errors.InvalidRequest, match="bid price"):
        await client.change_bid(instance_id, 0.0001)


async def test_slow_endpoint_hits_deadline(tmp_path):
    # Two attempts time out after 0.4 s each. The third gets the 0.4 s left of the deadline
    # as its timeout, so it ends at the deadline, and no fourth attempt starts.
    emu = await started(tmp_path, faults=FaultPlan.from_data(
        [{"kind": "slow", "endpoint": "POST /bundles/", "delay_s": 2.0}]))
    try:
        async with fast_client(emu, timeout_s=0.4, deadline_s=1.2, max_attempts=10) as vast:
            with pytest.raises(errors.DeadlineExceeded) as caught:
                await vast.search_offers(limit=1)
        assert caught.value.endpoint == "POST /bundles/"
        assert "after 3 attempts" in str(caught.value)
        assert emu.request_count("POST /bundles/") == 3
    finally:
        await emu.stop()


async def test_unreachable_api_connection_failed(tmp_path, caplog):
    emu = await started(tmp_path)
    url = emu.url
    await emu.stop()
    async with VastClient("key", base_url=url, max_attempts=3, backoff_base_s=0.001) as vast:
        with pytest.raises(errors.ConnectionFailed) as caught:
            await vast.search_offers(limit=1)
    assert "after 3 attempts" in str(caught.value)
    retries = [r for r in caught_records(caplog) if "retrying POST /bundles/" in r]
    assert len(retries) == 2


def caught_records(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
