"""SIGTERM and SIGINT handling: record the request, let the training loop stop between steps.

The handler only sets a flag, because the loop must finish its step before it checkpoints.
The grace period counts from the first signal.

A Python signal handler runs in the main thread between two of its bytecodes, so the main
thread may hold any lock at that moment: an Event's (a `threading.Event` guards its flag
with a plain Lock, which the same thread cannot take twice), a logging handler's, a
stream's. The handler therefore takes no lock and logs nothing. It stores the signal in
plain attributes; the request is recorded and logged when the loop next reads it, and
`wait` polls those attributes while it sleeps.
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
# How long `wait` sleeps between two looks at a stored signal: the most it adds to the time
# between a signal and the loop's reaction.
SIGNAL_POLL_S = 0.05


class PreemptionHandler:
    """Call install() from the main thread; poll stop_requested between training steps."""

    def __init__(self, grace_period_s: float = DEFAULT_GRACE_PERIOD_S) -> None:
        self.grace_period_s = grace_period_s
        self._reason: str | None = None
        self._requested = threading.Event()
        self._requested_at: float | None = None
        self._record_lock = threading.Lock()  # never taken by the signal handler
        # Written only by the signal handler: the first stop signal and when it came.
        self._signalled: int | None = None
        self._signalled_at = 0.0
        self._previous: dict[int, Any] = {}
        # Called with the signal number (None for other requests) on the first request only;
        # wrapper mode uses it to forward the signal to its child. For a signal it is called
        # from the signal handler, so it must not block or take a lock the main thread uses.
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
        self._take_signal()
        return self._requested.is_set()

    @property
    def signal_number(self) -> int | None:
        """The first stop signal received, None while none came (or a stop came another way)."""
        return self._signalled

    @property
    def reason(self) -> str | None:
        """Why the stop was requested: the first request's reason; None while none came."""
        self._take_signal()
        return self._reason

    def request_stop(self, reason: str, signum: int | None = None) -> None:
        """Ask the loop to stop as on SIGTERM; later requests keep the first reason and time."""
        self._take_signal()
        if not self._record(reason, time.monotonic()):
            logger.info("stop already requested (%s); ignoring: %s", self._reason, reason)
            return
        if self.on_request is not None:
            self.on_request(signum)

    def remaining_grace_s(self) -> float:
        """Seconds left of the grace period; the full period while no stop is requested."""
        self._take_signal()
        if self._requested_at is None:
            return self.grace_period_s
        return max(0.0, self.grace_period_s - (time.monotonic() - self._requested_at))

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to timeout_s, waking early on a stop request; return stop_requested."""
        deadline = time.monotonic() + timeout_s
        while not self.stop_requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # Another thread's request sets the event and wakes this at once; a signal is
            # seen at the next look.
            self._requested.wait(min(left, SIGNAL_POLL_S))
        return True

    def _record(self, reason: str, at: float) -> bool:
        """Record the first request and log it; return False if one was recorded before."""
        with self._record_lock:
            if self._requested.is_set():
                return False
            self._reason, self._requested_at = reason, at
            self._requested.set()
        logger.warning("stop requested: %s; grace period %.1f s", reason, self.grace_period_s)
        return True

    def _take_signal(self) -> None:
        signum = self._signalled
        if signum is not None and not self._requested.is_set():
            self._record(f"received {signal.Signals(signum).name}", self._signalled_at)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Only plain reads and writes here: see the module docstring.
        if self._signalled is not None or self._requested.is_set():
            return
        self._signalled_at = time.monotonic()
        self._signalled = signum
        if self.on_request is not None:
            self.on_request(signum)
