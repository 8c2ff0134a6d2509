"""The Vast.ai emulator: an aiohttp server on 127.0.0.1 with a seeded market and instances
that are local process groups, plus routes under ``/_emulator/`` to inject faults."""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Awaitable, Mapping

from aiohttp import web

from gpujobs.emulator.api import ApiRoutes
from gpujobs.emulator.errors import EmulatorError, FaultPlanError
from gpujobs.emulator.faults import FaultPlan, FaultState
from gpujobs.emulator.injected import corrupt, injected_response
from gpujobs.emulator.instances import Fleet
from gpujobs.emulator.market import Market
from gpujobs.emulator.ratelimit import DEFAULT_THRESHOLDS_S, RateLimiter, too_frequent_body
from gpujobs.emulator.rows import error_response, json_response
from gpujobs.vast.transport import endpoint_key

logger = logging.getLogger(__name__)

# Routes that work without a key, as on the real API.
_PUBLIC_ENDPOINTS = frozenset({"POST /bundles/", "PUT /search/asks/", "GET /gpu_names/unique/"})


class Emulator:
    """A local stand-in for the Vast.ai API.

    ``rate_limits`` is True for the real per-endpoint thresholds, False for none, or a mapping
    of endpoint name (``"PUT /asks/{id}/"``) to seconds.

    ``time_scale`` is emulated seconds per real second. Billing, ``loading_s``,
    ``stop_grace_s``, ``logs_ready_s`` and the plan's timed faults and grace periods all count
    emulated seconds, so a test at 3600 bills an hour and loads for ``loading_s / 3600`` real
    seconds. Rate-limit thresholds and slow responses stay in real seconds.
    """

    def __init__(self, *, seed: int = 0, api_key: str | None = None, time_scale: float = 1.0,
                 loading_s: float = 2.0, faults: FaultPlan | None = None,
                 workdir: Path | None = None, rate_limits: bool | Mapping[str, float] = True,
                 offers_per_gpu: int | None = None, credit_usd: float = 1000.0,
                 stop_grace_s: float = 2.0, logs_ready_s: float = 0.3):
        if time_scale <= 0:
            raise EmulatorError(f"time_scale must be > 0 (emulated seconds per real second), "
                                f"got {time_scale!r}")
        self.seed = seed
        self.time_scale = time_scale
        self.logs_ready_s = logs_ready_s
        self.api_key_generated = api_key is None
        self.api_key = api_key or secrets.token_hex(32)
        self.url = ""
        self.market = Market(seed, offers_per_gpu)
        self.fault_state = FaultState(faults or FaultPlan(), seed)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="vast-emu-"))
        self.fleet = Fleet(workdir=self.workdir, time_scale=time_scale, loading_s=loading_s,
                           faults=lambda: self.fault_state, stop_grace_s=stop_grace_s)
        thresholds = (DEFAULT_THRESHOLDS_S if rate_limits is True
                      else dict(rate_limits) if rate_limits else {})
        self._limiter = RateLimiter(thresholds)
        self._initial_credit_usd = credit_usd
        self._counts: Counter[str] = Counter()
        self._next_id = 30_000_000 + seed % 1_000_000 * 7
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stopped = False

    def __repr__(self) -> str:
        return f"Emulator(url={self.url!r}, seed={self.seed})"

    # Server -----------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start serving and return the base URL, such as ``http://127.0.0.1:40123``."""
        app = web.Application(middlewares=[self._middleware])
        ApiRoutes(self).register(app)
        self._register_control(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_port = self._runner.addresses[0][1]
        self.url = f"http://{host}:{bound_port}"
        logger.info("Vast.ai emulator listening on %s (seed %d)", self.url, self.seed)
        return self.url

    async def stop(self) -> None:
        """Kill every instance's process group and stop the server; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        for task in list(self._tasks):
            task.cancel()
        await self.fleet.shutdown()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        logger.info("Vast.ai emulator stopped")

    async def __aenter__(self) -> "Emulator":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def background(self, coro: Awaitable[Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def next_instance_id(self) -> int:
        self._next_id += 1 + self._next_id % 13
        return self._next_id

    # Inspection and fault injection -----------------------------------------------------

    def _instance(self, instance_id: int):
        inst = self.fleet.get_live(instance_id)
        if inst is None:
            raise EmulatorError(f"instance {instance_id} does not exist or was destroyed")
        return inst

    async def preempt(self, instance_id: int, *, sigterm: bool = True, grace_s: float = 5.0) -> None:
        """Outbid the instance: SIGTERM, ``grace_s`` emulated seconds, SIGKILL; all stopped."""
        await self.fleet.preempt(self._instance(instance_id), sigterm=sigterm, grace_s=grace_s)

    async def set_offline(self, instance_id: int) -> None:
        """Drop the instance's host: the process is killed and the status reads "offline"."""
        await self.fleet.drop_host(self._instance(instance_id), "offline")

    async def set_unknown(self, instance_id: int) -> None:
        """Lose the host's heartbeat: the process is killed and the status reads "unknown"."""
        await self.fleet.drop_host(self._instance(instance_id), "unknown")

    def set_faults(self, plan: FaultPlan) -> None:
        self.fault_state = FaultState(plan, self.seed)

    def ledger(self) -> list[dict[str, Any]]:
        """Return every instance ever created, with its cost billed so far."""
        return [{
            "id": inst.id, "label": inst.label, "offer_id": inst.offer["id"],
            "machine_id": inst.offer["machine_id"], "host_id": inst.offer["host_id"],
            "dph_total": inst.dph_total, "created_at": inst.created_at,
            "destroyed_at": inst.destroyed_at, "status": inst.status_label(),
            "cost_usd": round(inst.cost_usd(), 9),
        } for inst in self.fleet.instances.values()]

    def live_instance_ids(self) -> list[int]:
        return [inst.id for inst in self.fleet.live()]

    def total_charges_usd(self) -> float:
        return sum(inst.cost_usd() for inst in self.fleet.instances.values())

    def credit_usd(self) -> float:
        return self._initial_credit_usd - self.fleet.spend.total_usd()

    def request_count(self, endpoint: str | None = None) -> int:
        """API calls received, all or for one endpoint name such as ``"POST /bundles/"``."""
        return sum(self._counts.values()) if endpoint is None else self._counts[endpoint]

    # HTTP plumbing ----------------------------------------------------------------------

    def _caller(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("bearer "):
            return header[7:].strip()
        return request.query.get("api_key")

    def _auth_failure(self, request: web.Request, public: bool) -> web.Response | None:
        key = self._caller(request)
        if key is None:
            if public:
                return None
            return error_response(403, "auth_error", "This action requires login.")
        if not secrets.compare_digest(key, self.api_key):
            return error_response(401, "auth_error", "Invalid user key")
        return None

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/_emulator/"):
            return self._auth_failure(request, public=False) or await handler(request)
        if request.path.startswith("/_logs/"):
            return await handler(request)

        endpoint = endpoint_key(request.method, request.path)
        self._counts[endpoint] += 1
        fault = self.fault_state.http_fault(endpoint)
        if fault.delay_s:
            # Read the body before the delay, because a slow server has received the whole
            # request and acts on it even when the client times out before the reply.
            await request.read()
            await asyncio.sleep(fault.delay_s)
        if fault.status is not None:
            return injected_response(fault)
        failure = self._auth_failure(request, public=endpoint in _PUBLIC_ENDPOINTS)
        if failure is not None:
            return failure
        threshold_s = self._limiter.check(endpoint, self._caller(request) or request.remote or "")
        if threshold_s is not None:
            return web.Response(status=429, text=too_frequent_body(threshold_s))
        try:
            response = await handler(request)
        except web.HTTPNotFound:
            return error_response(404, "not_found", f"no route for {request.method} "
                                  f"{request.path}")
        except web.HTTPMethodNotAllowed:
            return error_response(405, "method_not_allowed", f"{request.method} is not allowed "
                                  f"on {request.path}")
        except ConnectionResetError:
            # The client went away while its body was read, as a killed supervisor does, so
            # the handler stopped there and no one reads the reply.
            logger.info("%s %s: the client closed the connection mid-request", request.method,
                        request.path)
            return web.Response(status=400, text="connection closed by the client")
        if response.status >= 400:
            logger.info("%s %s returned HTTP %d", request.method, request.path, response.status)
        if fault.disconnect and request.transport is not None:
            # The request took effect but the reply is lost. The client sees the server
            # disconnect and cannot tell whether the request took effect.
            logger.info("fault: %s %s handled, connection closed without a reply",
                        request.method, request.path)
            request.transport.close()
        return corrupt(response, fault.malformed) if fault.malformed else response

    def _register_control(self, app: web.Application) -> None:
        app.router.add_post("/_emulator/instances/{instance_id:\\d+}/preempt", self._http_preempt)
        app.router.add_post("/_emulator/instances/{instance_id:\\d+}/offline", self._http_offline)
        app.router.add_post("/_emulator/instances/{instance_id:\\d+}/unknown", self._http_unknown)
        app.router.add_get("/_emulator/ledger", self._http_ledger)
        app.router.add_post("/_emulator/faults", self._http_faults)

    async def _http_preempt(self, request: web.Request) -> web.Response:
        body = await _json_or_empty(request)
        try:
            await self.preempt(int(request.match_info["instance_id"]),
                               sigterm=bool(body.get("sigterm", True)),
                               grace_s=float(body.get("grace_s", 5.0)))
        except EmulatorError as exc:
            return error_response(404, "no_such_instance", str(exc))
        return json_response({"success": True})

    async def _http_offline(self, request: web.Request) -> web.Response:
        return await _control(self.set_offline(int(request.match_info["instance_id"])))

    async def _http_unknown(self, request: web.Request) -> web.Response:
        return await _control(self.set_unknown(int(request.match_info["instance_id"])))

    async def _http_ledger(self, request: web.Request) -> web.Response:
        return json_response({"ledger": self.ledger(),
                              "total_charges_usd": self.total_charges_usd()})

    async def _http_faults(self, request: web.Request) -> web.Response:
        try:
            self.set_faults(FaultPlan.from_data(await _json_or_empty(request)))
        except FaultPlanError as exc:
            return error_response(400, "invalid_args", str(exc))
        return json_response({"success": True, "rules": len(self.fault_state.plan.rules)})


async def _control(action: Awaitable[None]) -> web.Response:
    try:
        await action
    except EmulatorError as exc:
        return error_response(404, "no_such_instance", str(exc))
    return json_response({"success": True})


async def _json_or_empty(request: web.Request) -> dict:
    if not request.body_exists:
        return {}
    try:
        data = await request.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {"rules": data}
