"""SIGTERM and SIGINT handling: record the request, let the training loop stop between steps.

The handler only sets a flag, because the loop must finish its step before it checkpoints.
The grace period counts from the first signal.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_GRACE_PERIOD_S = 10.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionHandler:
    """Call install() from the main thread; poll stop_requested between training steps."""

    def __init__(self, grace_period_s: float = DEFAULT_GRACE_PERIOD_S) -> None:
        self.grace_period_s = grace_period_s
        self.reason: str | None = None
        self._requested = threading.Event()
        self._requested_at: float | None = None
        self._previous: dict[int, Any] = {}
        # Called with the signal number (None for other requests) on the first request only;
        # wrapper mode uses it to forward the signal to its child.
        self.on_request: Callable[[int | None], None] | None = None

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        self.install()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.uninstall()

    @property
    def stop_requested(self) -> bool:
        return self._requested.is_set()

    def request_stop(self, reason: str, signum: int | None = None) -> None:
        """Ask the loop to stop as on SIGTERM; later requests keep the first reason and time."""
        if self._requested.is_set():
            logger.info("stop already requested (%s); ignoring: %s", self.reason, reason)
            return
        self.reason = reason
        self._requested_at = time.monotonic()
        self._requested.set()
        logger.warning("stop requested: %s; grace period %.1f s", reason, self.grace_period_s)
        if self.on_request is not None:
            self.on_request(signum)

    def remaining_grace_s(self) -> float:
        """Seconds left of the grace period; the full period while no stop is requested."""
        if self._requested_at is None:
            return self.grace_period_s
        return max(0.0, self.grace_period_s - (time.monotonic() - self._requested_at))

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to timeout_s, waking early on a stop request; return stop_requested."""
        return self._requested.wait(timeout_s)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.request_stop(f"received {signal.Signals(signum).name}", signum)
