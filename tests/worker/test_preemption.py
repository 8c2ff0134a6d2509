"""The stop-request handler: signals in any phase of a wait, requests from other threads."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time

import pytest

from worker import preemption
from worker.preemption import PreemptionHandler

# A process that waits in a tight loop, with the timeout given as its argument. With no
# timeout, a signal often lands in the middle of a wait's own locking. With a short one, it
# lands while the Event's wait sleeps.
BUSY_WAITER = """
import sys
from worker.preemption import PreemptionHandler
timeout_s = float(sys.argv[1])
handler = PreemptionHandler()
handler.install()
print("ready", flush=True)
while not handler.wait(timeout_s):
    pass
print("stopped:", handler.reason, flush=True)
"""


@pytest.fixture
def handler() -> PreemptionHandler:
    installed = PreemptionHandler(grace_period_s=30.0)
    installed.install()
    yield installed
    installed.uninstall()


# With no timeout, each run of the old handler, which set an Event from the signal handler,
# hung more than half the time, so 20 runs that all end are a near-certain sign of the fix.
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("timeout_s", "runs"), [(0.0, 20), (0.001, 5)])
def test_signal_during_a_busy_wait_always_stops_it(timeout_s: float, runs: int) -> None:
    for run in range(runs):
        waiter = subprocess.Popen([sys.executable, "-c", BUSY_WAITER, str(timeout_s)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


def test_first_signal_wins_and_forwards_once(
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


# With the polling slice longer than the test's timeout, only the event can end the wait.
@pytest.mark.timeout(20)
def test_request_from_another_thread_wakes_the_wait(
    handler: PreemptionHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preemption, "SIGNAL_POLL_S", 60.0)
    forwarded: list[int | None] = []
    handler.on_request = forwarded.append
    requester = threading.Timer(0.1, handler.request_stop, args=("budget spent",))
    requester.start()

    assert handler.wait(60.0) is True
    assert handler.reason == "budget spent"
    requester.join()  # the request is forwarded after the event is set
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
