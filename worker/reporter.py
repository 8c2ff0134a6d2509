"""Reports to the supervisor, by HTTP POST or through the mailbox object in the storage.

Reporter.report() only queues a report, so training does not wait for the network. The queue
is drained on the background loop, each HTTP request times out after HTTP_TIMEOUT_S, and
failures are logged at most once a minute.
Each report is a full snapshot of the worker's status, so a lost one does no harm.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp

from worker.background import BackgroundLoop
from worker.protocol import MAILBOX_KEY, REPORT_PATH, CheckpointRef, Report, ReportKind
from worker.storage import Storage, StorageError

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_INTERVAL_S = 2.0
HTTP_TIMEOUT_S = 2.0
FAILURE_LOG_INTERVAL_S = 60.0


class ReportTransport(Protocol):
    async def send(self, report: Report) -> bool:
        """Deliver report; return True if the supervisor asks this attempt to stop."""

    async def close(self) -> None: ...


class ReportFailed(Exception):
    """A report was not delivered; the next one carries the same state, so it is only logged."""


class HttpTransport:
    """POSTs reports to the supervisor with the job's bearer token."""

    def __init__(
        self, supervisor_url: str, job_id: str, token: str, timeout_s: float = HTTP_TIMEOUT_S
    ) -> None:
        self.url = supervisor_url.rstrip("/") + REPORT_PATH.format(job_id=job_id)
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def send(self, report: Report) -> bool:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        body = report.to_json()
        try:
            async with self._session.post(
                self.url, data=body, headers={"Content-Type": "application/json"}
            ) as response:
                if response.status == 200:
                    return False
                if response.status == 409:
                    answer = await response.json(content_type=None)
                    return bool(answer.get("stop")) if isinstance(answer, dict) else False
                raise ReportFailed(f"supervisor at {self.url} answered HTTP {response.status}")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ReportFailed(f"cannot send report to {self.url}: {exc!r}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class MailboxTransport:
    """Overwrites the mailbox object with each report; the supervisor polls it."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    async def send(self, report: Report) -> bool:
        try:
            await self.storage.put_bytes(MAILBOX_KEY, report.to_json().encode())
        except StorageError as exc:
            raise ReportFailed(f"cannot write the mailbox in {self.storage.uri}: {exc}") from exc
        return False

    async def close(self) -> None:
        return None


class _RateLimitedLog:
    """Logs the first failure, then at most one line per interval with the count in between."""

    def __init__(self, interval_s: float = FAILURE_LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last_logged = -float("inf")
        self._suppressed = 0

    def warning(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_logged < self.interval_s:
            self._suppressed += 1
            return
        if self._suppressed:
            message = f"{message} ({self._suppressed} more failures not logged)"
        logger.warning("%s", message)
        self._last_logged, self._suppressed = now, 0


class Reporter:
    """Keeps the worker's status and sends it with every report, in order."""

    def __init__(
        self,
        transport: ReportTransport,
        loop: BackgroundLoop,
        *,
        job_id: str,
        attempt: int,
        total_steps: int,
        heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self.transport = transport
        self.heartbeat_interval_s = heartbeat_interval_s
        self._loop = loop
        self._on_stop = on_stop
        self._lock = threading.Lock()
        self._status = Report(
            job_id=job_id, attempt=attempt, kind=ReportKind.HEARTBEAT, step=0,
            total_steps=total_steps, sent_at=0.0,
        )  # fmt: skip
        self._failures = _RateLimitedLog()
        self._heartbeat_queued = False
        self._queue: asyncio.Queue[Report] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.sent_count = 0
        loop.run(self._start(), timeout_s=10)

    async def _start(self) -> None:
        self._queue = asyncio.Queue()
        self._tasks.append(asyncio.create_task(self._drain_queue(), name="report-sender"))

    def start_heartbeats(self) -> None:
        async def start() -> None:
            self._tasks.append(asyncio.create_task(self._beat(), name="heartbeat"))

        self._loop.run(start(), timeout_s=10)

    @property
    def status(self) -> Report:
        with self._lock:
            return self._status

    def update(self, step: int | None = None, metrics: dict[str, float] | None = None) -> None:
        """Record progress for the next report without sending anything."""
        changes: dict[str, Any] = {}
        if step is not None:
            changes["step"] = step
        if metrics is not None:
            changes["metrics"] = dict(metrics)
        with self._lock:
            self._status = dataclasses.replace(self._status, **changes)

    def report(self, kind: ReportKind, **changes: Any) -> None:
        """Apply changes to the status (step, metrics, last_checkpoint, ...) and queue a report."""
        with self._lock:
            status = dataclasses.replace(self._status, **changes)
            if kind is ReportKind.CHECKPOINT_SAVED:
                status = _clear_finished_checkpointing(status)
            self._status = status
            report = dataclasses.replace(status, kind=kind, sent_at=time.time())
        self._loop.loop.call_soon_threadsafe(self._enqueue, report)

    def checkpoint_saved(self, ref: CheckpointRef) -> None:
        """Report ref as durable; usable as CheckpointManager's on_durable callback."""
        self.report(ReportKind.CHECKPOINT_SAVED, last_checkpoint=ref)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queued report was sent or failed; return False on timeout."""
        assert self._queue is not None
        try:
            self._loop.run(self._queue.join(), timeout_s)
        except TimeoutError:
            return False
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (up to timeout_s), then stop the heartbeat and the sender."""
        self.flush(timeout_s)

        async def stop() -> None:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.transport.close()

        try:
            self._loop.run(stop(), timeout_s=5)
        except TimeoutError:
            logger.warning("report sender did not stop within 5 s")

    def _enqueue(self, report: Report) -> None:
        assert self._queue is not None
        self._queue.put_nowait(report)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            if self._heartbeat_queued:
                continue  # the sender is behind; one queued heartbeat is enough
            with self._lock:
                report = dataclasses.replace(
                    self._status, kind=ReportKind.HEARTBEAT, sent_at=time.time()
                )
            self._heartbeat_queued = True
            self._enqueue(report)

    async def _drain_queue(self) -> None:
        assert self._queue is not None
        while True:
            report = await self._queue.get()
            try:
                await self._send(report)
            finally:
                if report.kind is ReportKind.HEARTBEAT:
                    self._heartbeat_queued = False
                self._queue.task_done()

    async def _send(self, report: Report) -> None:
        try:
            stop = await self.transport.send(report)
        except ReportFailed as exc:
            self._failures.warning(f"{report.kind} report not delivered: {exc}")
            return
        self.sent_count += 1
        if stop:
            logger.warning("supervisor asked attempt %d to stop", report.attempt)
            if self._on_stop is not None:
                self._on_stop()


def _clear_finished_checkpointing(status: Report) -> Report:
    saved = status.last_checkpoint
    if status.checkpointing_step is not None and saved and saved.step >= status.checkpointing_step:
        return dataclasses.replace(status, checkpointing_step=None)
    return status


def make_transport(
    storage: Storage, supervisor_url: str | None, job_id: str, token: str, mode: str = ""
) -> ReportTransport:
    """HTTP when a supervisor URL is set, else (or with mode 'mailbox') the mailbox object."""
    if mode == "mailbox" or not supervisor_url:
        return MailboxTransport(storage)
    return HttpTransport(supervisor_url, job_id, token)
