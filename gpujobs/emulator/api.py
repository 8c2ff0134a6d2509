"""Handlers for the Vast.ai API routes the emulator serves, with the real shapes and errors."""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gpujobs.emulator.errors import QueryError
from gpujobs.emulator.filters import check_filters, compile_filters, parse_order, sort_rows
from gpujobs.emulator.rows import (
    FILTERABLE_COLUMNS, charge_record, error_response, instance_row, json_response,
)

if TYPE_CHECKING:
    from gpujobs.emulator.app import Emulator

logger = logging.getLogger(__name__)

PAGE_MAX = 25


def _route_pairs(path: str) -> tuple[str, ...]:
    """Register every route with and without its trailing slash, as the API accepts both."""
    return (path, path.rstrip("/")) if path.endswith("/") else (path, path + "/")


class ApiRoutes:
    def __init__(self, emulator: "Emulator"):
        self.emu = emulator
        self._logs: dict[str, dict[str, Any]] = {}

    def register(self, app: web.Application) -> None:
        table = [
            ("POST", "/api/v0/bundles/", self.search_offers),
            ("PUT", "/api/v0/search/asks/", self.search_asks),
            ("PUT", "/api/v0/asks/{offer_id:\\d+}/", self.create_instance),
            ("GET", "/api/v1/instances/", self.list_instances),
            ("GET", "/api/v0/instances/", self.legacy_list),
            ("GET", "/api/v0/instances/filters/", self.instance_filters),
            ("GET", "/api/v0/instances/{instance_id:\\d+}/", self.show_instance),
            ("PUT", "/api/v0/instances/{instance_id:\\d+}/", self.update_instance),
            ("DELETE", "/api/v0/instances/{instance_id:\\d+}/", self.destroy_instance),
            ("PUT", "/api/v0/instances/bid_price/{instance_id:\\d+}/", self.change_bid),
            ("PUT", "/api/v0/instances/request_logs/{instance_id:\\d+}/", self.request_logs),
            ("GET", "/api/v0/users/current/", self.current_user),
            ("GET", "/api/v0/charges/", self.charges),
            ("GET", "/api/v0/gpu_names/unique/", self.gpu_names),
            ("GET", "/_logs/{token}.log", self.log_result),
        ]
        for method, path, handler in table:
            for variant in _route_pairs(path) if not path.endswith(".log") else (path,):
                app.router.add_route(method, variant, handler)

    # Offers -----------------------------------------------------------------------------

    async def search_offers(self, request: web.Request) -> web.Response:
        query = await _json_body(request)
        if not isinstance(query, dict):
            return error_response(400, "invalid_args", "search body must be a JSON object")
        try:
            offers = self.emu.market.search(query)
        except (QueryError, ValueError) as exc:
            return error_response(400, "invalid_args", f"error 400: {exc}")
        return json_response({"offers": offers})

    async def search_asks(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        query = body.get("q", {}) if isinstance(body, dict) else {}
        try:
            offers = self.emu.market.search(query if isinstance(query, dict) else {})
        except (QueryError, ValueError) as exc:
            return error_response(400, "invalid_args", f"error 400: {exc}")
        return json_response({"offers": offers})

    async def create_instance(self, request: web.Request) -> web.Response:
        offer_id = int(request.match_info["offer_id"])
        body = await _json_body(request)
        if not isinstance(body, dict) or not body.get("image"):
            return error_response(400, "invalid_args", "error 400/3467: image is required",
                                  ask_id=offer_id)
        price = body.get("price")
        if price is not None and not _valid_price(price):
            return error_response(400, "invalid_price", "error 400/3467: price must be a "
                                  "number between 0.001 and 128", ask_id=offer_id)
        if self.emu.credit_usd() <= 0:
            return json_response({"success": False, "msg": "Insufficient credit"}, 411)
        if offer_id in self.emu.market.offers and self.emu.fault_state.offer_vanishes():
            self.emu.market.take(offer_id)
            logger.info("fault: offer %d taken by another renter", offer_id)
        offer = self.emu.market.take(offer_id)
        if offer is None:
            return _offer_gone(offer_id, rented=self.emu.market.was_rented(offer_id),
                               cancel_unavail=bool(body.get("cancel_unavail")))
        return self._rent(offer_id, offer, body)

    def _rent(self, offer_id: int, offer: dict, body: dict) -> web.Response:
        instance_id = self.emu.next_instance_id()
        priced = self.emu.market.priced(offer, float(body.get("disk") or 10.0))
        price = body.get("price")
        bid_too_low = price is not None and float(price) < float(offer["min_bid"])
        self.emu.fleet.create(instance_id, priced, body, start=not bid_too_low)
        if bid_too_low:
            return error_response(
                400, "invalid_price", f"error 400/3467: bid price {float(price):g} is below the "
                f"minimum bid {offer['min_bid']:g} for offer {offer_id}; the instance was created "
                "stopped", ask_id=offer_id, new_contract=instance_id)
        return json_response({"success": True, "new_contract": instance_id,
                              "instance_api_key": secrets.token_hex(16)})

    async def gpu_names(self, request: web.Request) -> web.Response:
        return json_response({"gpu_names": self.emu.market.gpu_names()})

    # Instances --------------------------------------------------------------------------

    async def list_instances(self, request: web.Request) -> web.Response:
        try:
            filters = _json_param(request, "select_filters", {})
            order = parse_order(_json_param(request, "order_by", [{"col": "id", "dir": "asc"}]))
            columns = _json_param(request, "select_cols", None)
            check_filters(filters)
        except QueryError as exc:
            return error_response(400, "invalid_request", f"Error in query parameters: {exc}")
        bad = sorted(set(filters) - FILTERABLE_COLUMNS)
        if bad:
            return error_response(400, "invalid_request", f"Error in query parameters: {bad[0]} "
                                  "is not a valid search key")
        offset = _decode_token(request.query.get("after_token"))
        if offset is None:
            return error_response(400, "invalid_token", "after_token is not a valid token")

        # Filter and sort on the stored columns alone, then build full rows for the page only:
        # a list of thousands of instances costs a pass over small dicts, not full rows.
        fast = all(column in FILTERABLE_COLUMNS for column, _ in order)
        keyed = [(_stored_columns(inst) if fast else instance_row(inst), inst)
                 for inst in self.emu.fleet.live()]
        test = compile_filters(filters)
        keyed = [(row, inst) for row, inst in keyed if test(row)]
        by_id = {row["id"]: inst for row, inst in keyed}
        rows = sort_rows([row for row, _ in keyed], order + [("id", "asc")])
        limit = _page_size(request.query.get("limit"))
        page = [instance_row(by_id[row["id"]]) for row in rows[offset:offset + limit]]
        more = offset + len(page) < len(rows)
        labels: dict[str, int] = {}
        for row in rows:
            labels[row["label"] or ""] = labels.get(row["label"] or "", 0) + 1
        if isinstance(columns, list) and "*" not in columns:
            page = [{column: row.get(column) for column in columns} for row in page]
        return json_response({
            "success": True, "instances_found": len(page), "total_instances": len(rows),
            "label_counts": labels, "instances": page,
            "next_token": _encode_token(offset + len(page)) if more else None,
        })

    async def legacy_list(self, request: web.Request) -> web.Response:
        return error_response(410, "gone", "Use /api/v1/instances/ instead")

    async def instance_filters(self, request: web.Request) -> web.Response:
        combos = {(inst.actual_status, inst.offer["verification"], inst.offer["gpu_name"])
                  for inst in self.emu.fleet.live()}
        return json_response({"filters": [
            {"actual_status": status, "verification": verification, "gpu_name": gpu}
            for status, verification, gpu in sorted(combos, key=str)]})

    async def show_instance(self, request: web.Request) -> web.Response:
        inst = self.emu.fleet.get_live(int(request.match_info["instance_id"]))
        return json_response({"instances": None if inst is None else instance_row(inst)})

    async def update_instance(self, request: web.Request) -> web.Response:
        inst = self.emu.fleet.get_live(int(request.match_info["instance_id"]))
        if inst is None:
            return _no_such_instance()
        body = await _json_body(request)
        if not isinstance(body, dict):
            return error_response(400, "invalid_args", "body must be a JSON object")
        state = body.get("state")
        if state not in (None, "running", "stopped"):
            return error_response(400, "invalid_args", f"state {state!r} is invalid; use "
                                  "'running' or 'stopped'")
        if "label" in body:
            label = body["label"]
            if label is not None and len(str(label)) > 1024:
                return error_response(400, "invalid_args", "label is longer than 1024 characters")
            inst.label = None if label is None else str(label)
        if state == "stopped":
            self.emu.background(self.emu.fleet.request_stop(inst))
        elif state == "running":
            if inst.is_bid and float(inst.price) < float(inst.offer["min_bid"]):
                return error_response(400, "invalid_price", "bid price is below min_bid; raise "
                                      "it with change bid first")
            await self.emu.fleet.start(inst)
        return json_response({"success": True})

    async def destroy_instance(self, request: web.Request) -> web.Response:
        inst = self.emu.fleet.get_live(int(request.match_info["instance_id"]))
        if inst is None:
            return error_response(404, "not_found", "Instance not found")
        await self.emu.fleet.destroy(inst)
        self.emu.market.relist(inst.offer)
        return json_response({"success": True, "msg": "destroying instance"})

    async def change_bid(self, request: web.Request) -> web.Response:
        inst = self.emu.fleet.get_live(int(request.match_info["instance_id"]))
        if inst is None:
            return _no_such_instance()
        body = await _json_body(request)
        price = body.get("price") if isinstance(body, dict) else None
        if not _valid_price(price):
            return error_response(400, "invalid_args", "Please set a bid price >= 0.001.")
        resume = inst.cur_state == "stopped" and inst.is_bid
        inst.price = float(price)
        if resume and inst.price >= float(inst.offer["min_bid"]):
            await self.emu.fleet.start(inst)
        else:
            self.emu.fleet.rerate(inst)
        return json_response({"success": True})

    async def request_logs(self, request: web.Request) -> web.Response:
        inst = self.emu.fleet.get_live(int(request.match_info["instance_id"]))
        if inst is None:
            return error_response(404, "invalid_id", "Invalid instance id.")
        body = await _json_body(request)
        try:
            tail = int((body or {}).get("tail") or 1000) if isinstance(body, dict) else 1000
        except (TypeError, ValueError):
            return error_response(400, "invalid_args", "tail must be a number of lines")
        token = secrets.token_hex(16)
        self._logs[token] = {"instance": inst, "tail": tail,
                             "ready_at": time.monotonic() + self._logs_ready_real_s(),
                             "text": None}
        return json_response({"success": True, "result_url": f"{self.emu.url}/_logs/{token}.log",
                              "msg": "Logs will be uploaded to the result url shortly."})

    def _logs_ready_real_s(self) -> float:
        return self.emu.fleet.real_s(self.emu.logs_ready_s)

    async def log_result(self, request: web.Request) -> web.Response:
        """Unauthenticated, like the object-store URL the real API hands out."""
        entry = self._logs.get(request.match_info["token"])
        if entry is None or time.monotonic() < entry["ready_at"]:
            return web.Response(status=404, text="NoSuchKey: the log is not uploaded yet")
        if entry["text"] is None:
            from gpujobs.emulator.container import read_tail
            entry["text"] = read_tail(entry["instance"].log_path, entry["tail"])
        return web.Response(text=entry["text"], content_type="text/plain")

    # Account ----------------------------------------------------------------------------

    async def current_user(self, request: web.Request) -> web.Response:
        credit = round(self.emu.credit_usd(), 6)
        return json_response({
            "id": 424242, "api_key": self.emu.api_key, "key_id": 1,
            "email": "emulator@example.invalid",
            "username": "emulator", "fullname": "Vast.ai emulator", "balance": 0.0,
            "credit": credit, "balance_threshold": 0.0, "can_pay": True, "has_billing": True,
            "ssh_key": None, "sid": None, "host_agreement_accepted": False,
        })

    async def charges(self, request: web.Request) -> web.Response:
        try:
            filters = _json_param(request, "select_filters", {})
        except QueryError as exc:
            return error_response(400, "invalid_request", str(exc))
        day = filters.get("day") if isinstance(filters, dict) else None
        if not isinstance(day, dict) or "gte" not in day or "lte" not in day:
            return error_response(400, "invalid_request", "select_filters.day with gte and lte "
                                  "(epoch seconds) is required")
        start, end = float(day["gte"]), float(day["lte"])
        types = (filters.get("type") or {}).get("in", ["instance"])
        records = [charge_record(inst) for inst in self.emu.fleet.instances.values()]
        records = [r for r in records if r["type"] in types and r["start"] <= end
                   and r["end"] >= start]
        records.sort(key=lambda r: r["start"],
                     reverse=request.query.get("latest_first", "true") == "true")
        offset = _decode_token(request.query.get("after_token"))
        if offset is None:
            return error_response(400, "invalid_token", "after_token is not a valid token")
        limit = max(1, min(500, int(_float(request.query.get("limit"), 100))))
        page = records[offset:offset + limit]
        more = offset + len(page) < len(records)
        return json_response({"success": True, "count": len(page), "total": len(records),
                              "results": page,
                              "next_token": _encode_token(offset + len(page)) if more else None})


def _offer_gone(offer_id: int, *, rented: bool, cancel_unavail: bool) -> web.Response:
    """Build the error response to a create for an offer that is not on the market.

    A rented offer gives 410 when the create set ``cancel_unavail`` (the instance cannot
    start, and the caller asked for no stopped instance); otherwise, and for an id that was
    never listed, the API gives 404.
    """
    if rented and cancel_unavail:
        return error_response(410, "no_such_ask", f"error 410/3907: no_such_ask Instance type "
                              f"{offer_id} is no longer available.", ask_id=offer_id)
    return error_response(404, "invalid_args", f"error 404/3603: no_such_ask Instance type by "
                          f"id {offer_id} is not available.", ask_id=offer_id)


def _no_such_instance() -> web.Response:
    return error_response(404, "no_such_instance", "Instance with that ID does not exist.")


def _valid_price(price: Any) -> bool:
    value = _float(price, None)
    return value is not None and 0.001 <= value <= 128


def _float(value: Any, default: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


async def _json_body(request: web.Request) -> Any:
    if not request.body_exists:
        return {}
    try:
        return await request.json(loads=json.loads)
    except ValueError:
        return None


def _json_param(request: web.Request, name: str, default: Any) -> Any:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return json.loads(raw)
    except ValueError:
        raise QueryError(f"{name} is not valid JSON: {raw[:80]!r}") from None


def _page_size(raw: str | None) -> int:
    size = int(_float(raw, PAGE_MAX))
    return 5 if size <= 0 else min(size, PAGE_MAX)


def _encode_token(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode()


def _decode_token(token: str | None) -> int | None:
    """Return the offset in a page token (0 without one), or None when it is invalid."""
    if not token:
        return 0
    try:
        offset = json.loads(base64.urlsafe_b64decode(token.encode()))["offset"]
    except (ValueError, KeyError, TypeError):
        return None
    return offset if isinstance(offset, int) and offset >= 0 else None


def _stored_columns(inst: Any) -> dict[str, Any]:
    """Return the columns the real API stores, which the instance list can filter and sort by."""
    offer = inst.offer
    return {
        "id": inst.id, "label": inst.label, "actual_status": inst.actual_status,
        "intended_status": inst.intended_status, "cur_state": inst.cur_state,
        "next_state": inst.next_state, "gpu_name": offer["gpu_name"],
        "verification": offer["verification"], "machine_id": offer["machine_id"],
        "host_id": offer["host_id"], "is_bid": inst.is_bid, "num_gpus": offer["num_gpus"],
    }
