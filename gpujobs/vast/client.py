"""Async client for the Vast.ai REST API."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, TypedDict

import aiohttp
import msgspec

from gpujobs.settings import api_key_problem, url_problem
from gpujobs.vast import errors
from gpujobs.vast.query import parse_order, parse_query
from gpujobs.vast.records import Instance, Offer
from gpujobs.vast.transport import DEFAULT_MIN_INTERVAL_S, RetryPolicy, Transport

logger = logging.getLogger(__name__)

DEFAULT_URL = "https://console.vast.ai"


class _InstancePage(TypedDict, total=False):
    """The fields of an instance list page that the client reads.

    A page also carries `label_counts`, a count of every label among all the instances. With
    thousands of instances it makes up nearly all of the page's bytes. Decoding into this
    type skips it without building it, about eight times faster than json.loads of the page.
    """

    success: Any
    instances: Any
    next_token: Any


_decode_instance_page = msgspec.json.Decoder(_InstancePage).decode
USER_AGENT = "gpujobs-vast/0.1"
OFFER_TYPES = {"on-demand": "on-demand", "ondemand": "on-demand", "bid": "bid",
               "interruptible": "bid", "reserved": "reserved"}


def find_api_key(api_key: str | None = None) -> str | None:
    """Return the key from the argument, $VAST_API_KEY, or the CLI's key files, in that order."""
    if api_key:
        return api_key
    if os.environ.get("VAST_API_KEY"):
        return os.environ["VAST_API_KEY"].strip()
    home = Path.home()
    for path in (home / ".config" / "vastai" / "vast_api_key", home / ".vast_api_key"):
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError:
            continue
        except UnicodeDecodeError:
            raise errors.VastError(
                f"Vast.ai key file {path} is not UTF-8 text; write the key alone to it"
            ) from None
        if key:
            return key
    return None


def _check_connection(base_url: str, api_key: str | None) -> None:
    """Raise VastError for a base URL or key that aiohttp could not send; never quote the key."""
    problem = url_problem(base_url)
    if problem is not None:
        raise errors.VastError(f"Vast.ai URL {base_url!r} is invalid: {problem}; set VAST_URL "
                               "to http://HOST:PORT or https://HOST")
    problem = None if api_key is None else api_key_problem(api_key)
    if problem is not None:
        raise errors.VastError(f"the Vast.ai API key is invalid: {problem}; set VAST_API_KEY "
                               "to the key alone")


class VastClient:
    """Async Vast.ai client: offer search, instance lifecycle, logs and billing.

    Use as ``async with VastClient() as vast: ...``. Every call retries transient failures
    (see `gpujobs.vast.transport`) and raises a `gpujobs.vast.errors.VastError` subclass.
    """

    def __init__(self, api_key: str | None = None, *, base_url: str | None = None,
                 timeout_s: float = 30.0, max_attempts: int = 5, backoff_base_s: float = 0.15,
                 backoff_cap_s: float = 10.0, deadline_s: float = 120.0,
                 retry_after_cap_s: float = 60.0,
                 min_interval_s: Mapping[str, float] | None = None,
                 session: aiohttp.ClientSession | None = None):
        self.base_url = (base_url or os.environ.get("VAST_URL") or DEFAULT_URL).rstrip("/")
        api_key = find_api_key(api_key)
        _check_connection(self.base_url, api_key)
        policy = RetryPolicy(
            max_attempts=max(1, max_attempts), backoff_base_s=backoff_base_s,
            backoff_cap_s=backoff_cap_s, deadline_s=deadline_s,
            retry_after_cap_s=retry_after_cap_s, timeout_s=timeout_s,
        )
        intervals = dict(DEFAULT_MIN_INTERVAL_S)
        if min_interval_s is not None:
            intervals.update(min_interval_s)
        self._transport = Transport(self.base_url, api_key, policy, intervals,
                                    session, USER_AGENT)

    def __repr__(self) -> str:
        return f"VastClient(base_url={self.base_url!r})"

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> "VastClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return await self._transport.request(method, path, **kwargs)

    # Offers ------------------------------------------------------------------------------

    async def search_offers(self, query: Mapping | str | None = None, *,
                            order: list[tuple[str, str]] | str | None = None,
                            limit: int | None = None, offer_type: str = "on-demand",
                            allocated_storage_gb: float = 10.0) -> list[Offer]:
        """Search rentable offers; a string query uses the CLI syntax (see `parse_query`)."""
        if offer_type not in OFFER_TYPES:
            raise ValueError(f"offer_type {offer_type!r} is invalid; use one of "
                             f"{', '.join(sorted(OFFER_TYPES))}")
        body: dict[str, Any] = (
            dict(query) if isinstance(query, Mapping) else parse_query(query)
        )
        body["order"] = parse_order(order) if order else [["score", "desc"]]
        body["type"] = OFFER_TYPES[offer_type]
        body["allocated_storage"] = allocated_storage_gb
        if limit is not None:
            body["limit"] = int(limit)

        payload = await self._call("POST", "/bundles/", json_body=body)
        rows = payload.get("offers") if isinstance(payload, dict) else None
        if isinstance(rows, dict):
            rows = [rows]
        if not isinstance(rows, list):
            raise errors.InvalidResponse(
                "POST /bundles/ returned no 'offers' list; the API response format changed",
                endpoint="POST /bundles/", status=200)
        return [Offer.from_api(row) for row in rows if isinstance(row, Mapping)]

    # Instances ---------------------------------------------------------------------------

    async def create_instance(self, offer_id: int, *, image: str,
                              env: Mapping[str, str] | None = None, onstart: str | None = None,
                              args: list[str] | None = None, runtype: str | None = None,
                              label: str | None = None, disk_gb: float = 10.0,
                              price: float | None = None, cancel_unavail: bool = False) -> int:
        """Rent an offer and return the new instance id (``new_contract``).

        ``price`` makes the instance interruptible at that bid in $/hour. ``cancel_unavail``
        asks the API to fail (410) rather than create a stopped instance that cannot start.
        Raises OfferUnavailable when the offer is gone and BidTooLow (with the stopped
        instance's id) when the bid is below ``min_bid``.

        A create is not idempotent: a retry after a lost reply would find the offer rented
        and report it gone. So only a 429 or a refused connection is retried. A timeout, a 5xx
        or a dropped connection raises ConnectionFailed or ServerError at once, and the
        instance may exist: look for it by ``label`` before renting again.
        """
        body: dict[str, Any] = {
            "client_id": "me", "image": image, "env": dict(env or {}), "price": price,
            "disk": disk_gb, "label": label, "extra": None, "onstart": onstart,
            "image_login": None, "python_utf8": False, "lang_utf8": False,
            "use_jupyter_lab": False, "jupyter_dir": None, "force": False,
            "cancel_unavail": cancel_unavail, "template_hash_id": None, "user": None,
        }
        if args is not None:
            body["args"] = list(args)
            runtype = runtype or "args"
        if runtype:
            body["runtype"] = runtype
        payload = await self._call("PUT", f"/asks/{int(offer_id)}/", json_body=body,
                                   idempotent=False)
        contract = payload.get("new_contract") if isinstance(payload, dict) else None
        if contract is None:
            raise errors.InvalidResponse(
                f"PUT /asks/{{id}}/ for offer {offer_id} returned no new_contract; the API "
                "response format changed", endpoint="PUT /asks/{id}/", status=200)
        instance_id = int(contract)
        logger.info("created instance %d from offer %d", instance_id, offer_id)
        return instance_id

    async def list_instances(self, *, label: str | None = None,
                             filters: Mapping[str, Any] | None = None,
                             page_size: int = 25) -> list[Instance]:
        """List the account's instances through ``/api/v1/instances/``, following next_token.

        `filters` uses the stored columns the API can filter on (actual_status, label, id,
        gpu_name), e.g. ``{"actual_status": {"neq": "running"}}``.
        """
        instances: list[Instance] = []
        token: str | None = None
        while True:
            page, token = await self.list_instances_page(
                label=label, filters=filters, page_size=page_size, after_token=token
            )
            instances.extend(page)
            if not token:
                return instances

    async def list_instances_page(self, *, label: str | None = None,
                                  filters: Mapping[str, Any] | None = None, page_size: int = 25,
                                  after_token: str | None = None) -> tuple[list[Instance], str | None]:
        """Fetch one page of the instance list; returns it and the token of the next page."""
        query = dict(filters or {})
        if label is not None:
            query["label"] = {"eq": label}
        params = {
            "select_filters": json.dumps(query),
            "order_by": json.dumps([{"col": "id", "dir": "asc"}]),
            "limit": str(max(1, min(page_size, 25))),
        }
        if after_token:
            params["after_token"] = str(after_token)
        payload = await self._call("GET", "/api/v1/instances/", params=params,
                                   decoder=_decode_instance_page)
        rows = (payload.get("instances") or []) if isinstance(payload, dict) else []
        page = [Instance.from_api(row) for row in rows if isinstance(row, Mapping)]
        token = payload.get("next_token") if isinstance(payload, dict) else None
        return page, (str(token) if token else None)

    async def show_instance(self, instance_id: int) -> Instance | None:
        """Return the instance, or None when it is destroyed or unknown."""
        payload = await self._call("GET", f"/instances/{int(instance_id)}/",
                                   params={"owner": "me"})
        row = payload.get("instances") if isinstance(payload, dict) else None
        if isinstance(row, list):
            row = row[0] if row else None
        return Instance.from_api(row) if isinstance(row, Mapping) else None

    async def destroy_instance(self, instance_id: int) -> None:
        """Destroy the instance; raises InstanceNotFound when it is already gone."""
        try:
            await self._call("DELETE", f"/instances/{int(instance_id)}/", json_body={})
        except errors.InvalidRequest as exc:
            if "no_such_instance" in str(exc) or "not found" in str(exc).lower():
                raise errors.InstanceNotFound(str(exc), instance_id=instance_id,
                                              endpoint=exc.endpoint, status=exc.status) from exc
            raise
        logger.info("destroyed instance %d", instance_id)

    async def stop_instance(self, instance_id: int) -> None:
        await self._call("PUT", f"/instances/{int(instance_id)}/", json_body={"state": "stopped"})

    async def start_instance(self, instance_id: int) -> None:
        await self._call("PUT", f"/instances/{int(instance_id)}/", json_body={"state": "running"})

    async def label_instance(self, instance_id: int, label: str) -> None:
        await self._call("PUT", f"/instances/{int(instance_id)}/", json_body={"label": label})

    async def change_bid(self, instance_id: int, price: float) -> None:
        """Set an interruptible instance's bid in $/hour."""
        await self._call("PUT", f"/instances/bid_price/{int(instance_id)}/",
                         json_body={"client_id": "me", "price": float(price)})

    async def request_logs(self, instance_id: int, *, tail: int = 1000,
                           poll_interval_s: float = 0.3, max_polls: int = 30) -> str:
        """Fetch the container log's last ``tail`` lines.

        The API returns a ``result_url`` that gives 404 until the log is uploaded. The client
        polls it without the API key, because it lives on another host.
        """
        payload = await self._call("PUT", f"/instances/request_logs/{int(instance_id)}/",
                                   json_body={"tail": str(int(tail))})
        result_url = payload.get("result_url") if isinstance(payload, dict) else None
        if not result_url:
            raise errors.InvalidResponse(
                f"request_logs for instance {instance_id} returned no result_url",
                endpoint="PUT /instances/request_logs/{id}/", status=200)
        for _ in range(max_polls):
            await asyncio.sleep(poll_interval_s)
            status, body = await self._transport.get_unauthenticated(result_url)
            if status == 200:
                return body.decode("utf-8", "replace")
        raise errors.DeadlineExceeded(
            f"logs of instance {instance_id} were not ready after {max_polls} polls "
            f"{poll_interval_s}s apart; request them again",
            endpoint="GET result_url")

    # Account -----------------------------------------------------------------------------

    async def current_user(self) -> dict:
        """Return the account record without its ``api_key`` field."""
        payload = await self._call("GET", "/users/current/")
        if not isinstance(payload, dict):
            raise errors.InvalidResponse("GET /users/current/ did not return an object",
                                         endpoint="GET /users/current/", status=200)
        payload.pop("api_key", None)
        return payload

    async def charges(self, *, start: float, end: float, page_size: int = 100) -> list[dict]:
        """Return the charges whose day range overlaps [start, end] (epoch seconds), all pages."""
        params = {
            "select_filters": json.dumps({"day": {"gte": start, "lte": end}}),
            "latest_first": "true",
            "limit": str(max(1, min(page_size, 500))),
        }
        results: list[dict] = []
        while True:
            payload = await self._call("GET", "/charges/", params=params)
            if not isinstance(payload, dict):
                raise errors.InvalidResponse("GET /charges/ did not return an object",
                                             endpoint="GET /charges/", status=200)
            results.extend(row for row in payload.get("results") or [] if isinstance(row, dict))
            token = payload.get("next_token")
            if not token:
                return results
            params["after_token"] = str(token)
