"""Errors raised by the Vast.ai client.

Every error derives from `VastError`, which carries the endpoint (``"PUT /asks/{id}/"``) and
the HTTP status when there was one. The client scrubs the API key from every message.
"""

from __future__ import annotations


class VastError(Exception):
    """Root of every error the Vast.ai client raises."""

    def __init__(self, message: str, *, endpoint: str | None = None, status: int | None = None):
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status


class AuthError(VastError):
    """The API rejected the key (401 "Invalid user key") or no key was sent (403)."""


class InvalidRequest(VastError):
    """The API rejected the request body or parameters (400)."""


class OfferUnavailable(VastError):
    """The offer is rented or gone (404/410 ``no_such_ask``): search again and pick another."""

    def __init__(self, message: str, *, offer_id: int | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.offer_id = offer_id


class InstanceNotFound(VastError):
    """The instance id is unknown or the instance was already destroyed."""

    def __init__(self, message: str, *, instance_id: int | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.instance_id = instance_id


class BidTooLow(VastError):
    """The bid was below ``min_bid``, yet the API still created a stopped, billable instance.

    The caller owns `instance_id` and should destroy it.
    """

    def __init__(self, message: str, *, instance_id: int | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.instance_id = instance_id


class InsufficientCredit(VastError):
    """The account has no credit left to start an instance: add credit on the billing page."""


class RateLimited(VastError):
    """The endpoint returned 429 on every attempt; `retry_after_s` is the server's hint or None."""

    def __init__(self, message: str, *, retry_after_s: float | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after_s = retry_after_s


class SearchQuotaExceeded(VastError):
    """The daily offer-search quota is used up; it resets at UTC midnight, so no retry helps."""

    def __init__(self, message: str, *, reset_at: float | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.reset_at = reset_at


class ServerError(VastError):
    """The API returned 5xx on every attempt."""


class ConnectionFailed(VastError):
    """The API could not be reached, or timed out on every attempt."""


class InvalidResponse(VastError):
    """The API returned a body that is not the expected JSON (HTML, truncated JSON)."""


class DeadlineExceeded(VastError):
    """The total deadline across retries ran out before the request succeeded."""
