"""One attempt of a job on this worker: storage, reports, checkpoints, signals, final artifacts.

Training code drives it: restore(), started(), then step()/checkpoint() in its loop, and
stop() or complete() at the end. Each returns the process exit code where it ends the attempt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from worker import protocol
from worker.artifacts import read_completion_marker, write_final_artifacts
from worker.background import BackgroundLoop
from worker.checkpoint import CheckpointManager
from worker.config import WorkerConfig
from worker.errors import CheckpointTimeout
from worker.logs import LogCapture
from worker.preemption import PreemptionHandler
from worker.protocol import CheckpointRef, CompletionMarker, ReportKind
from worker.reporter import Reporter, make_transport
from worker.storage import Storage, StorageError, open_storage, preflight
from worker.wire import encode_metrics

logger = logging.getLogger(__name__)

# Time kept back from the grace period for the last report and the log upload.
STOP_RESERVE_S = 1.0
FINAL_UPLOAD_TIMEOUT_S = 120.0


class WorkerSession:
    """Wires the worker's parts together for one attempt; close() releases them."""

    def __init__(self, config: WorkerConfig, capture: LogCapture | None = None) -> None:
        self.config = config
        self.capture = capture
        self.loop = BackgroundLoop()
        self.storage: Storage = open_storage(config.artifact_uri)
        self.preemption = PreemptionHandler(config.grace_period_s)
        transport = make_transport(
            self.storage, config.supervisor_url, config.job_id, config.token, config.report_mode
        )
        self.reporter = Reporter(
            transport,
            self.loop,
            job_id=config.job_id,
            attempt=config.attempt,
            total_steps=config.total_steps,
            heartbeat_interval_s=config.heartbeat_interval_s,
            on_stop=lambda: self.preemption.request_stop("supervisor no longer wants this attempt"),
        )
        self.checkpoints = CheckpointManager(
            self.storage, self.loop, keep=config.keep_checkpoints,
            on_durable=self.reporter.checkpoint_saved,
        )  # fmt: skip
        self.metrics_lines: list[str] = []
        self._attempt_files_lock = asyncio.Lock()

    def preflight(self) -> None:
        """Check the storage works; raises StorageUnavailable in seconds if it does not."""
        self.loop.run(preflight(self.storage))

    def completion_marker(self) -> CompletionMarker | None:
        """Return this job's completion marker, or None. A marker of another job is ignored.

        Raises InvalidCompletionMarker when the stored marker cannot be parsed.
        """
        marker = self.loop.run(read_completion_marker(self.storage), timeout_s=60)
        if marker is not None and marker.job_id != self.config.job_id:
            logger.warning(
                "ignoring the completion marker in %s: it belongs to job %r, not %r",
                self.storage.uri, marker.job_id, self.config.job_id,
            )  # fmt: skip
            return None
        return marker

    def restore(self, map_location: Any = None) -> tuple[CheckpointRef, dict[str, Any]] | None:
        """Load the latest valid checkpoint; raises BadCheckpoint if it cannot be loaded."""
        restored = self.checkpoints.restore_latest(map_location)
        if restored is not None:
            self.reporter.update(step=restored[0].step)
        return restored

    def started(
        self, step: int, resumed_from: CheckpointRef | None, total_steps: int | None = None
    ) -> None:
        """Report the start, then begin heartbeats and the periodic log upload.

        total_steps overrides the configured length (batch inference counts shards).
        """
        total_steps = total_steps or self.config.total_steps
        self.reporter.report(
            ReportKind.STARTED,
            step=step,
            total_steps=total_steps,
            resumed_from_step=resumed_from.step if resumed_from else None,
            last_checkpoint=resumed_from,
        )
        self.reporter.start_heartbeats()
        self.loop.submit(self._upload_attempt_files_periodically())
        logger.info(
            "job %s attempt %d started at step %d of %d (%s)",
            self.config.job_id, self.config.attempt, step, total_steps,
            f"resumed from step {resumed_from.step}" if resumed_from else "fresh start",
        )  # fmt: skip

    def step(self, step: int, metrics: dict[str, float]) -> None:
        """Record a finished step; no network I/O happens here."""
        self.reporter.update(step=step, metrics=metrics)
        line = {"step": step, "time": round(time.time(), 3), **encode_metrics(metrics)}
        self.metrics_lines.append(json.dumps(line, sort_keys=True, allow_nan=False))

    def checkpoint_due(self, step: int) -> bool:
        return step % self.config.checkpoint_every == 0 and step < self.config.total_steps

    def checkpoint(self, step: int, state: dict[str, Any]) -> None:
        """Snapshot state and upload it in the background, with the metrics so far."""
        self.reporter.report(ReportKind.CHECKPOINT_STARTED, step=step, checkpointing_step=step)
        self.checkpoints.save(step, state)
        self.loop.submit(self._put_quietly(self._metrics_key(), self._metrics_bytes()))

    def stop(self, step: int, state: dict[str, Any]) -> int:
        """Write an emergency checkpoint if the grace period allows, report it, and exit."""
        logger.warning(
            "job %s attempt %d stopping at step %d: %s",
            self.config.job_id, self.config.attempt, step, self.preemption.reason,
        )  # fmt: skip
        self.reporter.report(ReportKind.STOPPING, step=step)
        self._save_emergency_checkpoint(step, state)
        self.upload_attempt_files(max(self.preemption.remaining_grace_s() - 0.5, 0.5))
        self.reporter.flush(max(self.preemption.remaining_grace_s(), 0.5))
        return protocol.EXIT_PREEMPTED

    def complete(self, step: int, model_bytes: bytes | None, metrics: dict[str, float]) -> int:
        """Store the final artifacts and the completion marker last, then report COMPLETED.

        model_bytes None stores no final/model.pt (batch inference writes outputs instead).
        """
        self.checkpoints.wait_durable(FINAL_UPLOAD_TIMEOUT_S)
        marker = CompletionMarker(
            job_id=self.config.job_id, attempt=self.config.attempt, step=step,
            completed_at=time.time(), metrics=metrics,
        )  # fmt: skip
        logger.info(
            "job %s attempt %d completed at step %d: %s",
            self.config.job_id, self.config.attempt, step, _format_metrics(metrics),
        )  # fmt: skip
        async def write() -> None:
            async with self._attempt_files_lock:  # after any periodic upload of the log
                extra = {
                    self._metrics_key(): self._metrics_bytes(),
                    self._log_key(): self._log_bytes(),
                }
                await write_final_artifacts(self.storage, model_bytes, metrics, marker, extra)

        self.loop.run(write(), FINAL_UPLOAD_TIMEOUT_S)
        self.reporter.report(ReportKind.COMPLETED, step=step, metrics=metrics)
        self.reporter.flush(10)
        return protocol.EXIT_OK

    def already_completed(self, marker: CompletionMarker) -> int:
        logger.info(
            "job %s already completed at step %d by attempt %d; not training again",
            marker.job_id, marker.step, marker.attempt,
        )  # fmt: skip
        self.reporter.report(ReportKind.COMPLETED, step=marker.step, metrics=marker.metrics)
        self.reporter.flush(10)
        return protocol.EXIT_OK

    def fail(self, error: str, exit_code: int = protocol.EXIT_FAILED) -> int:
        """Report the failure with its exit code, upload the log, and return the exit code."""
        logger.error("job %s attempt %d failed: %s", self.config.job_id, self.config.attempt, error)
        self.reporter.report(ReportKind.FAILED, error=error, exit_code=exit_code)
        self.upload_attempt_files(10)
        self.reporter.flush(5)
        return exit_code

    def close(self) -> None:
        self.reporter.close(timeout_s=5)
        try:
            self.loop.run(self.storage.close(), timeout_s=5)
        except (TimeoutError, StorageError) as exc:
            logger.warning("could not close storage %s: %s", self.storage.uri, exc)
        self.loop.close()

    def _save_emergency_checkpoint(self, step: int, state: dict[str, Any]) -> None:
        durable = self.checkpoints.last_durable
        if durable is not None and durable.step == step:
            logger.info("step %d is already durable; no emergency checkpoint needed", step)
            return
        budget_s = self.preemption.remaining_grace_s() - STOP_RESERVE_S
        estimate_s = self.checkpoints.last_upload_s or 0.0
        if budget_s <= estimate_s:
            logger.warning(
                "no time for an emergency checkpoint at step %d (%.1f s left, last upload %.1f s)",
                step, budget_s, estimate_s,
            )  # fmt: skip
            return
        self.reporter.report(ReportKind.CHECKPOINT_STARTED, checkpointing_step=step)
        self.checkpoints.save(step, state)
        try:
            ref = self.checkpoints.wait_durable(budget_s)
        except CheckpointTimeout:
            logger.warning(
                "emergency checkpoint at step %d not durable within %.1f s", step, budget_s
            )
            return
        if ref is None or ref.step != step:
            error = self.checkpoints.last_error
            logger.error("emergency checkpoint at step %d failed: %s", step, error)

    def upload_attempt_files(self, timeout_s: float) -> None:
        """Upload this attempt's metrics and log; storage errors and timeouts are only logged."""
        try:
            self.loop.run(self._upload_attempt_files(), timeout_s)
        except TimeoutError:
            logger.warning("attempt log and metrics not uploaded within %.1f s", timeout_s)

    async def _upload_attempt_files(self) -> None:
        # The lock keeps uploads in order, so an older copy never replaces a newer one.
        async with self._attempt_files_lock:
            await self._put_quietly(self._metrics_key(), self._metrics_bytes())
            await self._put_quietly(self._log_key(), self._log_bytes())

    async def _upload_attempt_files_periodically(self) -> None:
        """Upload the log and metrics every log_upload_interval_s while the attempt runs."""
        uploaded_size = -1
        while True:
            await asyncio.sleep(self.config.log_upload_interval_s)
            size = len(self.metrics_lines) + (self.capture.line_count() if self.capture else 0)
            if size != uploaded_size:
                uploaded_size = size
                await self._upload_attempt_files()

    async def _put_quietly(self, key: str, data: bytes) -> None:
        try:
            await self.storage.put_bytes(key, data)
        except StorageError as exc:
            logger.warning("could not upload %s: %s", key, exc)

    def _metrics_key(self) -> str:
        return protocol.attempt_metrics_key(self.config.attempt)

    def _log_key(self) -> str:
        return protocol.attempt_log_key(self.config.attempt)

    def _metrics_bytes(self) -> bytes:
        return "".join(line + "\n" for line in self.metrics_lines).encode()

    def _log_bytes(self) -> bytes:
        return self.capture.text().encode() if self.capture else b""


def _format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:.4f}" for name, value in sorted(metrics.items()))
