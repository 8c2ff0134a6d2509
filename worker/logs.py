"""Logging to stdout (the instance log) plus an in-memory copy uploaded as the attempt's log."""

from __future__ import annotations

import collections
import logging
import sys
import threading

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MAX_CAPTURED_LINES = 100_000


class LogCapture(logging.Handler):
    """Keeps the most recent formatted lines; older lines are dropped past max_lines."""

    def __init__(self, max_lines: int = MAX_CAPTURED_LINES) -> None:
        super().__init__()
        self._lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self._dropped = 0
        # Reentrant: the SIGTERM handler logs, and may run while this thread is in emit().
        self._lines_lock = threading.RLock()

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        with self._lines_lock:
            if len(self._lines) == self._lines.maxlen:
                self._dropped += 1
            self._lines.append(line)

    def add_line(self, line: str) -> None:
        """Add a line that did not come through logging (a child's output in wrapper mode)."""
        with self._lines_lock:
            if len(self._lines) == self._lines.maxlen:
                self._dropped += 1
            self._lines.append(line)

    def line_count(self) -> int:
        """Lines captured so far, dropped ones included; grows with every line."""
        with self._lines_lock:
            return self._dropped + len(self._lines)

    def text(self) -> str:
        with self._lines_lock:
            header = [f"[{self._dropped} earlier lines dropped]"] if self._dropped else []
            return "\n".join([*header, *self._lines]) + "\n"


def setup_logging(level: int = logging.INFO, prefix: str = "") -> LogCapture:
    """Send worker logs to stdout and return the capture that keeps a copy for upload.

    prefix starts every line, e.g. "[rank 1] " for a rank other than 0 under torchrun.
    """
    formatter = logging.Formatter(prefix + LOG_FORMAT)
    stdout = logging.StreamHandler(sys.stdout)
    stdout.setFormatter(formatter)
    capture = LogCapture()
    capture.setFormatter(formatter)
    root = logging.getLogger()
    root.setLevel(level)
    root.addHandler(stdout)
    root.addHandler(capture)
    for noisy in ("botocore", "aiobotocore", "boto3", "urllib3", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return capture
