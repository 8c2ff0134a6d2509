"""Status codes, bodies and shapes of the emulated endpoints, checked with raw HTTP."""

from __future__ import annotations

import asyncio
import json

import pytest

from gpujobs.emulator import Emulator

from emu_helpers import cheap_offer, raw, wait_for


async def test_auth_bodies(emulator):
    status, _, body = await raw(emulator, "GET", "/api/v0/users/current/", key=None)
    assert status == 403
    assert body == {"success": False, "error": "auth_error", "msg": "This action requires login."}
    status, _, body = await raw(emulator, "GET", "/api/v0/users/current/", key="wrong")
    assert status == 401
    assert body == {"success": False, "error": "auth_error", "msg": "Invalid user key"}


async def test_search_needs_no_key_and_sends_plain_json(emulator):
    status, content_type, body = await raw(emulator, "POST", "/api/v0/bundles/", key=None,
                                           json={"limit": 2})
    assert status == 200
    assert content_type == "application/json"
    assert len(body["offers"]) == 2


async def test_legacy_api_key_param(emulator):
    status, _, body = await raw(emulator, "GET",
                                f"/api/v0/users/current?api_key={emulator.api_key}", key=None)
    assert status == 200
    assert body["api_key"] == emulator.api_key


@pytest.mark.parametrize("path", ["/api/v0/users/current", "/api/v0/users/current/"])
async def test_trailing_slash_optional(emulator, path):
    status, _, _ = await raw(emulator, "GET", path)
    assert status == 200


async def test_legacy_list_gone(emulator):
    status, _, body = await raw(emulator, "GET", "/api/v0/instances/?owner=me")
    assert status == 410
    assert "Use /api/v1/instances/ instead" in body["msg"]


async def test_unknown_route_is_json_404(emulator):
    status, content_type, body = await raw(emulator, "GET", "/api/v0/nonexistent/")
    assert status == 404
    assert content_type == "application/json"
    assert body["success"] is False


async def test_show_instance_plural_key_and_null(emulator, vast):
    instance_id = await vast.create_instance(await cheap_offer(vast), image="busybox")
    status, _, body = await raw(emulator, "GET", f"/api/v0/instances/{instance_id}/?owner=me")
    assert status == 200
    assert body["instances"]["id"] == instance_id
    assert body["instances"]["public_ipaddr"].endswith("\n")
    assert isinstance(body["instances"]["extra_env"], list)
    status, _, body = await raw(emulator, "DELETE", f"/api/v0/instances/{instance_id}/", json={})
    assert (status, body["success"]) == (200, True)
    status, _, body = await raw(emulator, "GET", f"/api/v0/instances/{instance_id}/")
    assert (status, body) == (200, {"instances": None})
    status, _, body = await raw(emulator, "DELETE", f"/api/v0/instances/{instance_id}/")
    assert status == 404
    assert body["error"] == "not_found"


async def test_v1_paging_filters_and_label_counts(emulator, vast):
    offers = await vast.search_offers("num_gpus=1", limit=30)
    assert len(offers) == 30
    for index, offer in enumerate(offers):
        await vast.create_instance(offer.id, image="busybox", label="even" if index % 2 else None)

    params = {"limit": "25", "select_filters": "{}"}
    status, _, first = await raw(emulator, "GET", "/api/v1/instances/", params=params)
    assert status == 200
    assert len(first["instances"]) == 25
    assert first["total_instances"] == 30
    assert first["label_counts"] == {"even": 15, "": 15}
    ids = [row["id"] for row in first["instances"]]
    assert ids == sorted(ids)
    status, _, second = await raw(emulator, "GET", "/api/v1/instances/",
                                  params={**params, "after_token": first["next_token"]})
    assert len(second["instances"]) == 5
    assert second["next_token"] is None
    assert len(await vast.list_instances()) == 30
    assert len(await vast.list_instances(label="even", page_size=4)) == 15

    status, _, labelled = await raw(emulator, "GET", "/api/v1/instances/", params={
        "select_filters": json.dumps({"label": {"in": [None]}}),
        "select_cols": json.dumps(["id", "label", "no_such_col"])})
    assert len(labelled["instances"]) == 15
    assert set(labelled["instances"][0]) == {"id", "label", "no_such_col"}
    assert labelled["instances"][0]["no_such_col"] is None

    status, _, small = await raw(emulator, "GET", "/api/v1/instances/", params={"limit": "0"})
    assert len(small["instances"]) == 5


async def test_v1_rejects_computed_column_and_bad_token(emulator):
    status, _, body = await raw(emulator, "GET", "/api/v1/instances/", params={
        "select_filters": json.dumps({"dph_total": {"lt": 1}})})
    assert status == 400
    assert body["error"] == "invalid_request"
    assert body["msg"] == "Error in query parameters: dph_total is not a valid search key"
    status, _, body = await raw(emulator, "GET", "/api/v1/instances/",
                                params={"after_token": "garbage!"})
    assert (status, body["error"]) == (400, "invalid_token")


async def test_update_instance_validation(emulator, vast):
    instance_id = await vast.create_instance(await cheap_offer(vast), image="busybox")
    path = f"/api/v0/instances/{instance_id}/"
    status, _, _ = await raw(emulator, "PUT", path, json={"label": "renamed"})
    assert status == 200
    assert (await vast.show_instance(instance_id)).label == "renamed"
    status, _, body = await raw(emulator, "PUT", path, json={"label": "x" * 1025})
    assert status == 400
    status, _, body = await raw(emulator, "PUT", path, json={"state": "paused"})
    assert status == 400
    status, _, body = await raw(emulator, "PUT", "/api/v0/instances/bid_price/1/",
                                json={"client_id": "me", "price": 0.5})
    assert (status, body["error"]) == (404, "no_such_instance")


async def test_logs_result_url_flow(emulator, vast):
    instance_id = await vast.create_instance(await cheap_offer(vast), image="busybox",
                                             onstart="echo line-one; echo line-two; sleep 60")
    await wait_for(lambda: "line-two" in (emulator.workdir / "instances" / str(instance_id)
                                          / "container.log").read_text()
                   if (emulator.workdir / "instances" / str(instance_id)
                       / "container.log").exists() else False)
    status, _, body = await raw(emulator, "PUT", f"/api/v0/instances/request_logs/{instance_id}/",
                                json={"tail": "1"})
    assert status == 200
    result_url = body["result_url"]
    assert result_url.startswith(emulator.url)
    relative = result_url[len(emulator.url):]
    early_status, _, _ = await raw(emulator, "GET", relative, key=None)
    assert early_status == 404
    await asyncio.sleep(0.4)
    ready_status, _, text = await raw(emulator, "GET", relative, key=None)
    assert ready_status == 200
    assert text == "line-two\n"
    status, _, body = await raw(emulator, "PUT", "/api/v0/instances/request_logs/5/", json={})
    assert (status, body["error"]) == (404, "invalid_id")


async def test_charges_need_day_range(emulator):
    status, _, body = await raw(emulator, "GET", "/api/v0/charges/")
    assert status == 400
    assert body["error"] == "invalid_request"


async def test_rate_limit_plain_text(tmp_path):
    emu = Emulator(seed=1, workdir=tmp_path / "emu")
    await emu.start()
    try:
        first, _, _ = await raw(emu, "GET", "/api/v0/instances/1/")
        second, content_type, body = await raw(emu, "GET", "/api/v0/instances/2/")
        other, _, _ = await raw(emu, "GET", "/api/v0/users/current/")
    finally:
        await emu.stop()
    assert first == 200
    assert second == 429
    assert content_type.startswith("text/plain")
    assert body == "API requests too frequent endpoint threshold=2"
    assert other == 200


async def test_request_count(emulator, vast):
    await vast.search_offers(limit=1)
    await vast.search_offers(limit=1)
    await vast.list_instances()
    assert emulator.request_count("POST /bundles/") == 2
    assert emulator.request_count("GET /api/v1/instances/") == 1
    assert emulator.request_count() == 3
