"""Reports over HTTP to a real aiohttp server on 127.0.0.1, and through the mailbox object."""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.worker.conftest import free_port
from tests.worker.processes import WorkerProcess, run_worker, worker_env
from worker import protocol
from worker.background import BackgroundLoop
from worker.protocol import CheckpointRef, Report, ReportKind
from worker.reporter import HttpTransport, MailboxTransport, Reporter, make_transport
from worker.storage import LocalStorage

TOKEN = "secret-token-123"
Kind = ReportKind


class RecordingSupervisor:
    """Serves the report endpoint on its own loop thread and records each request."""

    def __init__(self) -> None:
        self.loop = BackgroundLoop("test-supervisor")
        self.reports: list[Report] = []
        self.authorizations: list[str | None] = []
        self.paths: list[str] = []
        self.status = 200
        self.received = threading.Condition()
        self.url = self.loop.run(self._start())

    async def _start(self) -> str:
        app = web.Application()
        app.router.add_post(protocol.REPORT_PATH.format(job_id="{job_id}"), self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _handle(self, request: web.Request) -> web.Response:
        with self.received:
            self.paths.append(request.path)
            self.authorizations.append(request.headers.get("Authorization"))
            self.reports.append(Report.from_dict(await request.json()))
            self.received.notify_all()
        if self.status == 409:
            return web.json_response({"stop": True}, status=409)
        if self.status != 200:
            return web.json_response({"error": "rejected"}, status=self.status)
        return web.json_response({"ok": True})

    def kinds(self, skip_heartbeats: bool = True) -> list[ReportKind]:
        return [r.kind for r in self.reports if not (skip_heartbeats and r.kind is Kind.HEARTBEAT)]

    def wait_for(self, condition, timeout_s: float = 30) -> None:
        with self.received:
            if not self.received.wait_for(condition, timeout_s):
                raise AssertionError(f"condition not met; received {self.kinds(False)}")

    def close(self) -> None:
        self.loop.run(self._runner.cleanup())
        self.loop.close()


@pytest.fixture
def supervisor() -> Iterator[RecordingSupervisor]:
    server = RecordingSupervisor()
    yield server
    server.close()


@pytest.fixture
def background() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    yield loop
    loop.close()


def make_reporter(transport, loop: BackgroundLoop, **options) -> Reporter:
    options.setdefault("heartbeat_interval_s", 0.05)
    return Reporter(transport, loop, job_id="job-7", attempt=2, total_steps=100, **options)


REF = CheckpointRef(
    step=10, uri="file:///x/checkpoints/step-10/payload.pt", sha256="ab" * 32, size_bytes=3
)


def test_http_reports_in_order_with_token(supervisor, background) -> None:
    transport = HttpTransport(supervisor.url, "job-7", TOKEN)
    reporter = make_reporter(transport, background)

    reporter.report(Kind.STARTED, step=0, resumed_from_step=None)
    reporter.start_heartbeats()
    reporter.update(step=5, metrics={"loss": 0.5})
    supervisor.wait_for(lambda: len(supervisor.reports) >= 3)
    reporter.report(Kind.CHECKPOINT_STARTED, step=10, checkpointing_step=10)
    reporter.checkpoint_saved(REF)
    reporter.report(Kind.COMPLETED, step=100, metrics={"test_accuracy": 0.97})
    reporter.close()

    assert supervisor.kinds() == [
        Kind.STARTED, Kind.CHECKPOINT_STARTED, Kind.CHECKPOINT_SAVED, Kind.COMPLETED
    ]
    assert Kind.HEARTBEAT in supervisor.kinds(skip_heartbeats=False)
    assert set(supervisor.authorizations) == {f"Bearer {TOKEN}"}
    assert set(supervisor.paths) == {"/v1/jobs/job-7/reports"}
    beat = next(r for r in supervisor.reports if r.kind is Kind.HEARTBEAT)
    assert beat.step == 5
    assert beat.metrics == {"loss": 0.5}
    assert beat.attempt == 2
    saved = next(r for r in supervisor.reports if r.kind is Kind.CHECKPOINT_SAVED)
    assert saved.last_checkpoint == REF
    assert saved.checkpointing_step is None
    started = next(r for r in supervisor.reports if r.kind is Kind.CHECKPOINT_STARTED)
    assert started.checkpointing_step == 10
    assert supervisor.reports[-1].metrics == {"test_accuracy": 0.97}


def test_http_409_requests_stop(supervisor, background) -> None:
    supervisor.status = 409
    stopped = threading.Event()
    reporter = make_reporter(
        HttpTransport(supervisor.url, "job-7", TOKEN), background, on_stop=stopped.set
    )

    reporter.report(Kind.STARTED, step=0)
    reporter.flush()

    assert stopped.wait(10)
    reporter.close()


def test_http_rejection_logged_without_token(
    supervisor, background, caplog: pytest.LogCaptureFixture
) -> None:
    supervisor.status = 401
    reporter = make_reporter(HttpTransport(supervisor.url, "job-7", TOKEN), background)

    with caplog.at_level(logging.WARNING, logger="worker.reporter"):
        for step in range(5):
            reporter.report(Kind.HEARTBEAT, step=step)
        assert reporter.flush(30)
    reporter.close()

    messages = [record.getMessage() for record in caplog.records]
    assert len(supervisor.reports) == 5
    assert len(messages) == 1  # rate-limited: one line per minute
    assert "HTTP 401" in messages[0]
    assert TOKEN not in caplog.text


def test_unreachable_supervisor_does_not_raise(
    background, caplog: pytest.LogCaptureFixture
) -> None:
    transport = HttpTransport(f"http://127.0.0.1:{free_port()}", "job-7", TOKEN, timeout_s=1)
    reporter = make_reporter(transport, background)

    with caplog.at_level(logging.WARNING, logger="worker.reporter"):
        reporter.report(Kind.STARTED, step=0)
        reporter.report(Kind.HEARTBEAT, step=1)
        assert reporter.flush(30)
    reporter.close()

    assert reporter.sent_count == 0
    assert len(caplog.records) == 1
    assert "not delivered" in caplog.records[0].getMessage()
    assert TOKEN not in caplog.text


def test_mailbox_holds_latest_report(tmp_path: Path, background) -> None:
    storage = LocalStorage(tmp_path)
    reporter = make_reporter(MailboxTransport(storage), background)
    mailbox = tmp_path / protocol.MAILBOX_KEY

    reporter.report(Kind.STARTED, step=0, resumed_from_step=40)
    reporter.start_heartbeats()
    reporter.update(step=41)
    for _ in range(500):
        if mailbox.exists() and json.loads(mailbox.read_text())["kind"] == "heartbeat":
            break
        threading.Event().wait(0.01)
    heartbeat = Report.from_dict(json.loads(mailbox.read_text()))
    reporter.report(Kind.COMPLETED, step=100)
    reporter.close()
    final = Report.from_dict(json.loads(mailbox.read_text()))

    assert heartbeat.kind is Kind.HEARTBEAT
    assert heartbeat.step == 41
    assert heartbeat.resumed_from_step == 40
    assert final.kind is Kind.COMPLETED
    assert final.step == 100


def test_transport_choice(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)

    assert isinstance(make_transport(storage, None, "j", "t"), MailboxTransport)
    assert isinstance(make_transport(storage, "http://h", "j", "t", "mailbox"), MailboxTransport)
    assert isinstance(make_transport(storage, "http://h", "j", "t"), HttpTransport)


# The worker process reporting to the supervisor.


def http_env(store: Path, supervisor: RecordingSupervisor, **overrides: str) -> dict[str, str]:
    return worker_env(
        store,
        GPUJOBS_JOB_ID="job-7",
        GPUJOBS_SUPERVISOR_URL=supervisor.url,
        GPUJOBS_JOB_TOKEN=TOKEN,
        **overrides,
    )


def test_worker_reports_over_http(tmp_path: Path, supervisor) -> None:
    env = http_env(tmp_path / "store", supervisor, GPUJOBS_TOTAL_STEPS="120")

    worker = run_worker(["train-digits"], env)

    assert worker.process.returncode == protocol.EXIT_OK, worker.output()
    assert supervisor.kinds() == [
        Kind.STARTED,
        Kind.CHECKPOINT_STARTED, Kind.CHECKPOINT_SAVED,
        Kind.CHECKPOINT_STARTED, Kind.CHECKPOINT_SAVED,
        Kind.COMPLETED,
    ]  # fmt: skip
    assert set(supervisor.authorizations) == {f"Bearer {TOKEN}"}
    assert supervisor.reports[0].resumed_from_step is None
    assert supervisor.reports[-1].metrics["test_accuracy"] >= 0.95
    assert TOKEN not in worker.output()
    assert not (tmp_path / "store" / protocol.MAILBOX_KEY).exists()


def test_worker_sigterm_reports_stopping(tmp_path: Path, supervisor) -> None:
    env = http_env(tmp_path / "store", supervisor, GPUJOBS_STEP_DELAY_S="0.01")
    worker = WorkerProcess(["train-digits"], env)
    try:
        worker.wait_for_line(r"checkpoint at step 50 durable")
        # Past step 50 and its checkpoint, so the emergency checkpoint has something to add.
        supervisor.wait_for(
            lambda: any(r.kind is Kind.HEARTBEAT and r.step > 50 for r in supervisor.reports)
        )
        worker.process.send_signal(signal.SIGTERM)
        code = worker.wait(60)
    finally:
        worker.kill()

    assert code == protocol.EXIT_PREEMPTED, worker.output()
    kinds = supervisor.kinds()
    assert kinds[:3] == [Kind.STARTED, Kind.CHECKPOINT_STARTED, Kind.CHECKPOINT_SAVED]
    assert kinds[-3:] == [Kind.STOPPING, Kind.CHECKPOINT_STARTED, Kind.CHECKPOINT_SAVED]
    stopping = next(r for r in supervisor.reports if r.kind is Kind.STOPPING)
    assert supervisor.reports[-1].last_checkpoint.step == stopping.step


def test_worker_stops_when_supervisor_answers_409(tmp_path: Path, supervisor) -> None:
    supervisor.status = 409
    env = http_env(tmp_path / "store", supervisor, GPUJOBS_STEP_DELAY_S="0.01")

    worker = run_worker(["train-digits"], env)

    assert worker.process.returncode == protocol.EXIT_PREEMPTED, worker.output()
    assert "supervisor no longer wants this attempt" in worker.output()
    assert Kind.STOPPING in supervisor.kinds()
    assert Kind.COMPLETED not in supervisor.kinds()


def test_worker_mailbox_mode_ignores_url(tmp_path: Path, supervisor) -> None:
    store = tmp_path / "store"
    env = http_env(store, supervisor, GPUJOBS_REPORT_MODE="mailbox", GPUJOBS_TOTAL_STEPS="60")

    worker = run_worker(["train-digits"], env)

    assert worker.process.returncode == protocol.EXIT_OK, worker.output()
    assert supervisor.reports == []
    report = Report.from_dict(json.loads((store / protocol.MAILBOX_KEY).read_text()))
    assert report.kind is Kind.COMPLETED
    assert report.job_id == "job-7"
