"""The stop-request handler: signals in any phase of a wait, requests from other threads."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time

import pytest

from worker.preemption import PreemptionHandler

# A process that polls the handler as fast as it can, so that a signal often lands while
# the main thread is inside the wait's own locking.
BUSY_WAITER = """
from worker.preemption import PreemptionHandler
handler = PreemptionHandler()
handler.install()
print("ready", flush=True)
while not handler.wait(0):
    pass
print("stopped:", handler.reason, flush=True)
"""
# Each run of the old handler, which set an Event from the signal handler, hung here more
# than half the time; 20 runs all ending is then a near-certain sign of the fix.
BUSY_RUNS = 20


@pytest.fixture
def handler() -> PreemptionHandler:
    installed = PreemptionHandler(grace_period_s=30.0)
    installed.install()
    yield installed
    installed.uninstall()


@pytest.mark.timeout(120)
def test_signal_during_a_busy_wait_always_stops_it() -> None:
    for run in range(BUSY_RUNS):
        waiter = subprocess.Popen([sys.executable, "-c", BUSY_WAITER], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            assert waiter.stdout.readline() == "ready\n"  # type: ignore[union-attr]
            time.sleep(0.001 * (run % 10))
            waiter.send_signal(signal.SIGTERM)
            out, err = waiter.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            waiter.kill()
            waiter.communicate()
            pytest.fail(f"run {run}: the waiter did not stop within 10 s of SIGTERM")
        assert waiter.returncode == 0, err
        assert out == "stopped: received SIGTERM\n"
        assert "stop requested: received SIGTERM" in err


def test_signal_is_recorded_with_its_time_and_forwarded_once(
    handler: PreemptionHandler, caplog: pytest.LogCaptureFixture
) -> None:
    forwarded: list[int | None] = []
    handler.on_request = forwarded.append
    with caplog.at_level(logging.INFO, logger="worker.preemption"):
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)  # a second signal changes nothing
        assert forwarded == [signal.SIGTERM]
        assert handler.stop_requested
        handler.request_stop("supervisor no longer wants this attempt")

    assert handler.reason == "received SIGTERM"
    assert forwarded == [signal.SIGTERM]
    assert 0 < handler.remaining_grace_s() < 30.0
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "stop requested: received SIGTERM; grace period 30.0 s",
        "stop already requested (received SIGTERM); ignoring: "
        "supervisor no longer wants this attempt",
    ]


def test_request_from_another_thread_wakes_the_wait(handler: PreemptionHandler) -> None:
    forwarded: list[int | None] = []
    handler.on_request = forwarded.append
    threading.Timer(0.1, handler.request_stop, args=("budget spent",)).start()

    started = time.monotonic()
    assert handler.wait(60.0) is True
    assert handler.reason == "budget spent"
    assert forwarded == [None]
    signal.raise_signal(signal.SIGTERM)  # after a request, a signal is ignored
    assert handler.reason == "budget spent"
    assert forwarded == [None]


def test_wait_without_a_request_sleeps_its_time(handler: PreemptionHandler) -> None:
    started = time.monotonic()
    assert handler.wait(0.2) is False
    assert time.monotonic() - started >= 0.2
    assert handler.reason is None
    assert handler.remaining_grace_s() == 30.0
