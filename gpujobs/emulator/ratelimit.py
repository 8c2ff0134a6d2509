"""Per-endpoint, per-caller minimum intervals between calls, enforced with a plain-text 429."""

from __future__ import annotations

import time
from typing import Mapping

# Thresholds the real API names in its 429 bodies ("endpoint threshold=4.5"), read as seconds
# between two calls from one caller. The unit is not documented, so this is an estimate.
DEFAULT_THRESHOLDS_S: Mapping[str, float] = {
    "PUT /asks/{id}/": 4.5,
    "GET /instances/{id}/": 2.0,
    "PUT /instances/{id}/": 1.0,
    "DELETE /instances/{id}/": 3.0,
    "PUT /instances/bid_price/{id}/": 5.5,
    "GET /api/v1/instances/": 1.0,
    "GET /charges/": 1.0,
}
# Slack for clients that pace exactly at the threshold and see a little network jitter.
TOLERANCE_S = 0.05


class RateLimiter:
    def __init__(self, thresholds_s: Mapping[str, float]):
        self.thresholds_s = dict(thresholds_s)
        self._last_accepted: dict[tuple[str, str], float] = {}

    def check(self, endpoint: str, caller: str) -> float | None:
        """Return the threshold when the call comes too soon, else record it and return None."""
        threshold_s = self.thresholds_s.get(endpoint)
        if not threshold_s:
            return None
        now = time.monotonic()
        last = self._last_accepted.get((endpoint, caller))
        if last is not None and now - last < threshold_s - TOLERANCE_S:
            return threshold_s
        self._last_accepted[(endpoint, caller)] = now
        return None


def too_frequent_body(threshold_s: float) -> str:
    return f"API requests too frequent endpoint threshold={threshold_s:g}"
