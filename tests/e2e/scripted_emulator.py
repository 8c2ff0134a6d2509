"""The emulator with scripted replies per endpoint: hold a reply, fail a request, or drop it.

The emulator's own fault plan draws faults by rule and chance. These tests need one exact
sequence instead, such as "the next two DELETEs fail", so the script counts requests per
endpoint (named as ``"DELETE /instances/{id}/"``, see `endpoint_key`).
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from typing import Any

from aiohttp import web

from gpujobs.emulator import Emulator
from gpujobs.vast.transport import endpoint_key

CREATE = "PUT /asks/{id}/"
DESTROY = "DELETE /instances/{id}/"
SEARCH = "POST /bundles/"


class ScriptedEmulator(Emulator):
    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # Seconds to hold the reply after the endpoint acted: the effect exists, the caller
        # does not know yet.
        self.reply_delays_s: dict[str, float] = {}
        self.failures: Counter[str] = Counter()  # requests still to reply to with a 503
        self.dropped: Counter[str] = Counter()  # requests still to accept without acting
        self.arrived: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.calls: Counter[str] = Counter()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        endpoint = endpoint_key(request.method, request.path)
        self.calls[endpoint] += 1
        self.arrived[endpoint].set()
        if self.failures[endpoint] > 0:
            self.failures[endpoint] -= 1
            return web.json_response({"success": False, "msg": "scripted failure"}, status=503)
        if self.dropped[endpoint] > 0:
            self.dropped[endpoint] -= 1
            return web.json_response({"success": True})
        response = await super()._middleware(request, handler)
        delay_s = self.reply_delays_s.get(endpoint, 0.0)
        if delay_s and response.status < 400:
            await asyncio.sleep(delay_s)
        return response
