"""Responses that replace or corrupt the real one when a fault plan fires on a request."""

from __future__ import annotations

import time

from aiohttp import web

from gpujobs.emulator.faults import HttpFault
from gpujobs.emulator.rows import json_response

RATE_LIMIT_TEXT = "API requests too frequent"


def injected_response(fault: HttpFault) -> web.Response:
    """Build the 429 or 5xx response that replaces the handler's."""
    if fault.search_quota:
        reset = int(time.time()) // 86400 * 86400 + 86400
        response = json_response({"success": False, "error": "search_quota_exceeded",
                                  "msg": "Daily search quota exceeded"}, 429)
        response.headers["X-RateLimit-Reset"] = str(reset)
        return response
    if fault.status == 429:
        response = rate_limited_response(fault.rate_limit_body)
        if fault.retry_after_s is not None:
            response.headers["Retry-After"] = f"{fault.retry_after_s:g}"
        return response
    return web.Response(status=fault.status or 503, text="<html><body><h1>"
                        f"{fault.status} Service Unavailable</h1></body></html>",
                        content_type="text/html")


def rate_limited_response(form: str) -> web.Response:
    """Build a 429 in one of the forms the API sends: plain text, or JSON in two shapes."""
    if form == "detail":
        return json_response({"detail": RATE_LIMIT_TEXT}, 429)
    if form == "json":
        return json_response({"success": False, "error": "rate_limit_exceeded",
                              "msg": RATE_LIMIT_TEXT}, 429)
    return web.Response(status=429, text=RATE_LIMIT_TEXT)


def corrupt(response: web.StreamResponse, form: str) -> web.Response:
    """Cut the body in half ("truncated") or replace it with a proxy's HTML page ("html")."""
    body = response.body if isinstance(response, web.Response) else b""
    if form == "truncated" and isinstance(body, (bytes, bytearray)) and len(body) > 1:
        return web.Response(body=bytes(body[: len(body) // 2]), status=response.status,
                            content_type="application/json")
    return web.Response(status=response.status, content_type="text/html",
                        text="<!DOCTYPE html><html><body>Just a moment...</body></html>")
