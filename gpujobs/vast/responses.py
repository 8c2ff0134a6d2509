"""Decoding of Vast.ai API responses and their translation into `VastError` subclasses."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from gpujobs.vast import errors

# Retried statuses, as in the official CLI. The daily search quota (a 429) is the exception.
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})

_OFFER_ID = re.compile(r"/asks/(\d+)")
_KEY_FIELD = re.compile(r'("api_key"\s*:\s*")[^"]*("?)')
_INSTANCE_ID = re.compile(r"/instances/(?:[a-z_]+/)?(\d+)")


def scrub(text: str, secret: str | None = None) -> str:
    """Remove an API key from text quoted out of a response body."""
    text = _KEY_FIELD.sub(r"\1***\2", text)
    return text.replace(secret, "***") if secret else text


def decode_json(body: bytes, *, endpoint: str, status: int, secret: str | None = None,
                decoder: Callable[[bytes], Any] | None = None) -> Any:
    """Parse a JSON body; raises InvalidResponse for HTML, empty or truncated bodies.

    `decoder`, when given, parses the bytes instead of json.loads; it must raise ValueError
    (msgspec's DecodeError is one) for a body it cannot parse.
    """
    try:
        if decoder is not None:
            return decoder(body)
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        snippet = scrub(body[:80].decode("utf-8", "replace"), secret)
        raise errors.InvalidResponse(
            f"{endpoint} returned HTTP {status} with a body that is not valid JSON "
            f"(starts with {snippet!r}); the API or a proxy in front of it is misbehaving, "
            "retry later",
            endpoint=endpoint, status=status,
        ) from exc


def try_decode(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None


def is_search_quota(status: int, payload: Any) -> bool:
    return status == 429 and isinstance(payload, dict) and (
        payload.get("error") == "search_quota_exceeded"
    )


def error_message(payload: Any, body: bytes, secret: str | None = None) -> str:
    """Return the server's message: ``msg``, ``message``, ``detail`` or the plain-text body."""
    if isinstance(payload, dict):
        for key in ("msg", "message", "detail", "error"):
            if payload.get(key):
                return scrub(str(payload[key]), secret)
    return scrub(body[:200].decode("utf-8", "replace").strip(), secret) or "(empty body)"


def error_for(
    endpoint: str, path: str, status: int, body: bytes, *, retry_after_s: float | None = None,
    reset_at: float | None = None, secret: str | None = None,
) -> errors.VastError:
    """Build the error for a response that failed (an HTTP error or ``success: false``)."""
    payload = try_decode(body)
    message = error_message(payload, body, secret)
    code = payload.get("error") if isinstance(payload, dict) else None
    context = {"endpoint": endpoint, "status": status}
    where = f"{endpoint} returned HTTP {status}: {message}"

    if isinstance(payload, dict) and payload.get("new_contract") is not None:
        instance_id = int(payload["new_contract"])
        return errors.BidTooLow(
            f"{where}; instance {instance_id} was still created (stopped and billed for "
            "storage): destroy it, then bid at least the offer's min_bid",
            instance_id=instance_id, **context,
        )
    if status in (401, 403) or code == "auth_error":
        return errors.AuthError(
            f"{where}; check VAST_API_KEY (or the key file ~/.config/vastai/vast_api_key)",
            **context,
        )
    if status == 429:
        if is_search_quota(status, payload):
            return errors.SearchQuotaExceeded(
                f"{where}; the daily search quota resets at UTC midnight",
                reset_at=reset_at, **context,
            )
        return errors.RateLimited(
            f"{where}; slow down requests to this endpoint", retry_after_s=retry_after_s,
            **context,
        )
    if status in (402, 411) or "insufficient credit" in message.lower():
        return errors.InsufficientCredit(f"{where}; add credit to the account", **context)
    offer = _OFFER_ID.search(path)
    if offer and (status in (404, 410) or "no_such_ask" in message or code == "no_such_ask"):
        offer_id = int(offer.group(1))
        return errors.OfferUnavailable(
            f"offer {offer_id} is no longer available ({where}); search again and pick "
            "another offer", offer_id=offer_id, **context,
        )
    instance = _INSTANCE_ID.search(path)
    if instance and status == 404:
        instance_id = int(instance.group(1))
        return errors.InstanceNotFound(
            f"instance {instance_id} not found ({where}); it may already be destroyed",
            instance_id=instance_id, **context,
        )
    if status >= 500:
        return errors.ServerError(f"{where}; the API is failing, retry later", **context)
    if 400 <= status < 500:
        return errors.InvalidRequest(f"{where}; fix the request", **context)
    return errors.VastError(where, **context)


def parse_retry_after(value: str | None) -> float | None:
    """Read a Retry-After header given in seconds; an HTTP date or garbage gives None."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return max(seconds, 0.0)
