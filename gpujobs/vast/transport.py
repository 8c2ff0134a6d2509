"""Retrying, paced HTTP transport for the Vast.ai API.

Retries 429/502/503/504, connection errors and timeouts with capped exponential backoff and
full jitter, honours Retry-After, keeps a minimum interval between requests to each endpoint
(the API's limits are per endpoint) and stops at a total deadline across retries.

A request that is not idempotent (a create) is retried only when the server certainly did not
act on it: a 429, or a connection that was never established. After a timeout, a 5xx or a
connection lost once the request was sent, it may have taken effect, so the transport raises
at once and leaves the caller to find out what happened.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Mapping

import aiohttp

from gpujobs.vast import errors
from gpujobs.vast.responses import (
    RETRYABLE_STATUSES, decode_json, error_for, is_search_quota, parse_retry_after, try_decode,
)

logger = logging.getLogger(__name__)

# Minimum seconds between two requests to one endpoint. The values are the thresholds that the
# API's 429 bodies name; the unit is not documented, seconds is an estimate.
DEFAULT_MIN_INTERVAL_S: Mapping[str, float] = {
    "PUT /asks/{id}/": 4.5,
    "GET /instances/{id}/": 2.0,
    "PUT /instances/{id}/": 1.0,
    "DELETE /instances/{id}/": 3.0,
    "PUT /instances/bid_price/{id}/": 5.5,
    "GET /api/v1/instances/": 1.0,
    "GET /charges/": 1.0,
}

_VERSIONED = re.compile(r"^/api/v\d+/")
_NUMBER_SEGMENT = re.compile(r"/\d+(?=/|$)")


def endpoint_key(method: str, path: str) -> str:
    """Name an endpoint as ``"PUT /asks/{id}/"``: no ``/api/v0``, ids replaced, trailing slash."""
    path = path.split("?", 1)[0]
    if path.startswith("/api/v0/"):
        path = path[len("/api/v0"):]
    path = _NUMBER_SEGMENT.sub("/{id}", path)
    if not path.endswith("/"):
        path += "/"
    return f"{method.upper()} {path}"


def api_path(path: str) -> str:
    """Add the ``/api/v0`` prefix unless the path already names an API version."""
    if not path.startswith("/"):
        path = "/" + path
    return path if _VERSIONED.match(path) else "/api/v0" + path


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff_base_s: float = 0.15
    backoff_cap_s: float = 10.0
    deadline_s: float = 120.0
    retry_after_cap_s: float = 60.0
    timeout_s: float = 30.0

    def backoff_s(self, attempt: int, rng: random.Random) -> float:
        """Full-jitter backoff before attempt ``attempt + 1``."""
        return rng.uniform(0.0, min(self.backoff_cap_s, self.backoff_base_s * 2 ** (attempt - 1)))


class Pacer:
    """Keeps a minimum interval between two requests to the same endpoint."""

    def __init__(self, min_interval_s: Mapping[str, float]):
        self._min_interval_s = dict(min_interval_s)
        self._last_start: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def wait_turn(self, endpoint: str) -> None:
        interval_s = self._min_interval_s.get(endpoint, 0.0)
        if interval_s <= 0:
            return
        lock = self._locks.setdefault(endpoint, asyncio.Lock())
        async with lock:
            loop = asyncio.get_running_loop()
            last = self._last_start.get(endpoint)
            if last is not None:
                delay_s = last + interval_s - loop.time()
                if delay_s > 0:
                    await asyncio.sleep(delay_s)
            self._last_start[endpoint] = loop.time()

    def finished(self, endpoint: str) -> None:
        """Count the interval from the reply: the server times requests by their arrival.

        A request sent on time can still arrive less than an interval after the previous one,
        when the previous one was slower on the way. The previous reply came after the server
        saw that request, so an interval from the reply is always enough.
        """
        if endpoint in self._last_start:
            self._last_start[endpoint] = asyncio.get_running_loop().time()


@dataclass
class _Outcome:
    """The result of one attempt: a response, or the transport error that replaced it."""

    status: int | None = None
    headers: Mapping[str, str] | None = None
    body: bytes = b""
    failure: BaseException | None = None


class Transport:
    """Sends requests with retries; returns decoded JSON or raises a `VastError`."""

    def __init__(self, base_url: str, api_key: str | None, policy: RetryPolicy,
                 min_interval_s: Mapping[str, float], session: aiohttp.ClientSession | None,
                 user_agent: str):
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.policy = policy
        self._pacer = Pacer(min_interval_s)
        self._session = session
        self._owns_session = session is None
        self._single_send_session: aiohttp.ClientSession | None = None
        self._user_agent = user_agent
        self._rng = random.Random()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None
        if self._single_send_session is not None:
            await self._single_send_session.close()
            self._single_send_session = None

    def _get_session(self, idempotent: bool = True) -> aiohttp.ClientSession:
        """Return the session for one request.

        A session the caller passed in may resend a PUT, so a non-idempotent request gets a
        session of the transport's own.
        """
        if self._session is None:
            self._session = _new_session()
            self._owns_session = True
        if idempotent or self._owns_session:
            return self._session
        if self._single_send_session is None:
            self._single_send_session = _new_session()
        return self._single_send_session

    def _headers(self, auth: bool) -> dict[str, str]:
        headers = {"User-Agent": self._user_agent, "Accept": "application/json"}
        if auth and self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    async def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                      json_body: Any = None, expect_json: bool = True,
                      idempotent: bool = True,
                      decoder: Callable[[bytes], Any] | None = None) -> Any:
        """Send one API call with retries; ``path`` is relative to the API root.

        With ``idempotent=False``, an outcome the server may have acted on raises at once
        (ServerError for a 5xx, ConnectionFailed for a timeout or a lost connection).
        """
        full_path = api_path(path)
        endpoint = endpoint_key(method, full_path)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.policy.deadline_s

        for attempt in range(1, self.policy.max_attempts + 1):
            await self._pacer.wait_turn(endpoint)
            outcome = await self._attempt(method, full_path, params, json_body, deadline, endpoint,
                                          idempotent)
            self._pacer.finished(endpoint)
            if not idempotent and _may_have_taken_effect(outcome):
                raise self._unknown_outcome(outcome, endpoint, full_path)
            delay_s = self._retry_delay(outcome, attempt, endpoint, full_path)
            if delay_s is None:
                return self._finish(outcome, endpoint, full_path, expect_json, decoder)
            if attempt == self.policy.max_attempts:
                break
            if loop.time() + delay_s >= deadline:
                self._raise_deadline(endpoint, attempt, outcome)
            logger.warning("retrying %s after %s (attempt %d of %d, waiting %.2fs)", endpoint,
                           _describe(outcome), attempt, self.policy.max_attempts, delay_s)
            await asyncio.sleep(delay_s)
        raise self._final_error(outcome, endpoint, full_path, attempt)

    async def _attempt(self, method: str, path: str, params: Mapping[str, Any] | None,
                       json_body: Any, deadline: float, endpoint: str,
                       idempotent: bool) -> _Outcome:
        remaining_s = deadline - asyncio.get_running_loop().time()
        if remaining_s <= 0:
            raise errors.DeadlineExceeded(
                f"{endpoint} did not succeed within the {self.policy.deadline_s:.1f}s deadline",
                endpoint=endpoint)
        timeout = aiohttp.ClientTimeout(total=min(self.policy.timeout_s, remaining_s))
        try:
            async with self._get_session(idempotent).request(
                method, self.base_url + path, params=params, json=json_body,
                headers=self._headers(auth=True), timeout=timeout,
            ) as response:
                body = await response.read()
                return _Outcome(response.status, dict(response.headers), body)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                asyncio.TimeoutError) as exc:
            return _Outcome(failure=exc)

    def _retry_delay(self, outcome: _Outcome, attempt: int, endpoint: str,
                     path: str) -> float | None:
        """Seconds to wait before the next attempt, or None when this outcome is final."""
        if outcome.failure is not None:
            return self.policy.backoff_s(attempt, self._rng)
        if outcome.status not in RETRYABLE_STATUSES:
            return None
        if is_search_quota(outcome.status, try_decode(outcome.body)):
            return None
        retry_after_s = parse_retry_after(_header(outcome, "Retry-After"))
        if retry_after_s is None:
            return self.policy.backoff_s(attempt, self._rng)
        if retry_after_s > self.policy.retry_after_cap_s:
            return None
        return retry_after_s

    def _finish(self, outcome: _Outcome, endpoint: str, path: str, expect_json: bool,
                decoder: Callable[[bytes], Any] | None = None) -> Any:
        assert outcome.status is not None
        if outcome.status >= 400:
            raise self._error(outcome, endpoint, path)
        if not expect_json:
            return outcome.body
        payload = decode_json(outcome.body, endpoint=endpoint, status=outcome.status,
                              secret=self._api_key, decoder=decoder)
        if isinstance(payload, dict) and payload.get("success") is False:
            raise self._error(outcome, endpoint, path)
        return payload

    def _error(self, outcome: _Outcome, endpoint: str, path: str) -> errors.VastError:
        reset = _header(outcome, "X-RateLimit-Reset")
        return error_for(
            endpoint, path, outcome.status or 0, outcome.body,
            retry_after_s=parse_retry_after(_header(outcome, "Retry-After")),
            reset_at=parse_retry_after(reset), secret=self._api_key,
        )

    def _final_error(self, outcome: _Outcome, endpoint: str, path: str,
                     attempts: int) -> errors.VastError:
        if outcome.failure is None:
            return self._error(outcome, endpoint, path)
        return errors.ConnectionFailed(
            f"{endpoint} failed after {attempts} attempts: {_describe(outcome)}; check the "
            f"network and the API URL {self.base_url}", endpoint=endpoint,
        )

    def _unknown_outcome(self, outcome: _Outcome, endpoint: str,
                         path: str) -> errors.VastError:
        """Build the error for a non-idempotent request that may have taken effect."""
        advice = ("it was not retried because it may have taken effect; check whether it did "
                  "before sending it again")
        if outcome.failure is None:
            error = self._error(outcome, endpoint, path)
            if type(error) is not errors.ServerError:
                return error  # the body reports what happened, such as a bid too low
            return errors.ServerError(f"{error}; {advice}", endpoint=endpoint,
                                      status=outcome.status)
        return errors.ConnectionFailed(f"{endpoint} failed: {_describe(outcome)}; {advice}",
                                       endpoint=endpoint)

    def _raise_deadline(self, endpoint: str, attempts: int, outcome: _Outcome) -> None:
        raise errors.DeadlineExceeded(
            f"{endpoint} did not succeed within the {self.policy.deadline_s:.1f}s deadline "
            f"after {attempts} attempts (last: {_describe(outcome)}); raise deadline_s or retry "
            "later", endpoint=endpoint, status=outcome.status,
        )

    async def get_unauthenticated(self, url: str) -> tuple[int, bytes]:
        """GET an absolute URL without the API key (for log result URLs on other hosts)."""
        timeout = aiohttp.ClientTimeout(total=self.policy.timeout_s)
        headers = {"User-Agent": self._user_agent}
        try:
            async with self._get_session().get(url, headers=headers, timeout=timeout) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError):
            return 0, b""


def _new_session() -> aiohttp.ClientSession:
    """Open a session that sends each request once and leaves retries to the transport.

    aiohttp resends a PUT or DELETE once, silently, when the server disconnects, because
    HTTP calls those methods idempotent. A Vast.ai create is a PUT that is not, so a resend
    after a lost reply would report the offer gone while the first create rented it.
    """
    session = aiohttp.ClientSession()
    # NOTE: aiohttp 3.14 has no public switch for the resend; this is its private flag.
    if hasattr(session, "_retry_connection"):
        session._retry_connection = False
    return session


def _may_have_taken_effect(outcome: _Outcome) -> bool:
    """Return True for a failure after which the server may have acted on the request.

    That is a 5xx, a timeout or a connection lost after sending. A refused connection and
    a connect timeout happen before a byte of the request is sent.
    """
    if outcome.failure is None:
        return (outcome.status or 0) >= 500
    return not isinstance(outcome.failure, (aiohttp.ClientConnectorError,
                                            aiohttp.ConnectionTimeoutError))


def _header(outcome: _Outcome, name: str) -> str | None:
    for key, value in (outcome.headers or {}).items():
        if key.lower() == name.lower():
            return value
    return None


def _describe(outcome: _Outcome) -> str:
    if outcome.failure is None:
        return f"HTTP {outcome.status}"
    name = type(outcome.failure).__name__
    detail = str(outcome.failure)
    return f"{name}: {detail}" if detail else name
