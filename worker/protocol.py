"""Wire contract between the orchestrator and a worker: environment, reports, manifests.

The orchestrator imports this module; the worker image needs nothing else of the
orchestrator. Every format here carries a version so either side can be upgraded first.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from worker import wire

PROTOCOL_VERSION = 1

# Environment variables the orchestrator sets on every instance it creates.
ENV_JOB_ID = "GPUJOBS_JOB_ID"
ENV_ATTEMPT = "GPUJOBS_ATTEMPT"
ENV_ARTIFACT_URI = "GPUJOBS_ARTIFACT_URI"  # the job's own prefix, e.g. file:///data/artifacts/job-1
ENV_SUPERVISOR_URL = "GPUJOBS_SUPERVISOR_URL"  # base URL of the supervisor's report endpoint
ENV_JOB_TOKEN = "GPUJOBS_JOB_TOKEN"  # per-job bearer token for reports; never logged
ENV_HEARTBEAT_INTERVAL_S = "GPUJOBS_HEARTBEAT_INTERVAL_S"
ENV_TOTAL_STEPS = "GPUJOBS_TOTAL_STEPS"
ENV_CHECKPOINT_EVERY = "GPUJOBS_CHECKPOINT_EVERY"
ENV_KEEP_CHECKPOINTS = "GPUJOBS_KEEP_CHECKPOINTS"
ENV_GRACE_PERIOD_S = "GPUJOBS_GRACE_PERIOD_S"  # time the worker may spend on an emergency checkpoint
ENV_STEP_DELAY_S = "GPUJOBS_STEP_DELAY_S"  # optional pause per step, to make demos watchable
ENV_SEED = "GPUJOBS_SEED"
ENV_NUM_GPUS = "GPUJOBS_NUM_GPUS"  # the profile's num_gpus; above 1, training runs under torchrun
ENV_MODEL_URI = "GPUJOBS_MODEL_URI"  # batch inference: object URI of the model to load
ENV_DATASET_URI = "GPUJOBS_DATASET_URI"  # a dataset pushed with `gpujobs data push`
ENV_CACHE_DIR = "GPUJOBS_CACHE_DIR"  # local dataset cache; default ~/.cache/gpujobs
ENV_LOG_UPLOAD_INTERVAL_S = "GPUJOBS_LOG_UPLOAD_INTERVAL_S"  # seconds between log uploads

# Report endpoint, relative to ENV_SUPERVISOR_URL.
REPORT_PATH = "/v1/jobs/{job_id}/reports"

# Exit codes of the worker process.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_PREEMPTED = 75  # stopped by SIGTERM after writing what the grace period allowed
# A checkpoint or the completion marker exists but cannot be loaded, so a restart cannot help.
EXIT_BAD_CHECKPOINT = 76
EXIT_BAD_CONFIG = 78

# Artifact layout under the job's prefix.
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"
METRICS_DIR = "metrics"
FINAL_DIR = "final"
COMPLETION_MARKER = "COMPLETED.json"
MAILBOX_KEY = "mailbox/report.json"
MANIFEST_NAME = "manifest.json"
PAYLOAD_NAME = "payload.pt"
OUTPUTS_DIR = "outputs"  # batch inference results, one object per input shard
# Datasets live beside the jobs, under the artifact root: <root>/datasets/<sha256>/.
DATASETS_DIR = "datasets"


def checkpoint_prefix(step: int) -> str:
    """Key prefix of one checkpoint; the step is zero-padded so names also sort by step."""
    return f"{CHECKPOINTS_DIR}/step-{step:012d}"


def attempt_log_key(attempt: int) -> str:
    return f"{LOGS_DIR}/attempt-{attempt}.log"


def attempt_metrics_key(attempt: int) -> str:
    return f"{METRICS_DIR}/attempt-{attempt}.jsonl"


def shard_output_key(shard: int) -> str:
    return f"{OUTPUTS_DIR}/shard-{shard}.json"


# Size limits of the documents. Valid ones take a few hundred bytes.
MAX_REPORT_BYTES = 64 * 1024
MAX_MANIFEST_BYTES = 16 * 1024
MAX_MARKER_BYTES = 64 * 1024
MAX_URI_CHARS = 4096
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class InvalidReport(wire.InvalidDocument):
    """A report body that is not a valid report. The supervisor rejects it with HTTP 400."""


class InvalidManifest(wire.InvalidDocument):
    """A checkpoint manifest that is not valid, so its checkpoint is skipped."""


class InvalidCompletionMarker(wire.InvalidDocument):
    """A COMPLETED.json that is not a valid completion marker."""


class ReportKind(enum.StrEnum):
    """Reason a worker sent a report; every report also carries the full current status."""

    STARTED = "started"  # training began; resumed_from_step gives the restored step
    HEARTBEAT = "heartbeat"  # periodic liveness and progress
    CHECKPOINT_STARTED = "checkpoint_started"  # a checkpoint is being written
    CHECKPOINT_SAVED = "checkpoint_saved"  # last_checkpoint is now durable
    STOPPING = "stopping"  # SIGTERM received; an emergency checkpoint may follow
    COMPLETED = "completed"  # final artifacts and the completion marker are stored
    FAILED = "failed"  # unrecoverable; error gives the reason


@dataclass(frozen=True)
class CheckpointRef:
    """A durable checkpoint: its step, where it lives and the payload digest."""

    step: int
    uri: str
    sha256: str
    size_bytes: int

    @classmethod
    def from_dict(cls, data: Any) -> CheckpointRef:
        """Parse a checkpoint reference, or raise wire.InvalidDocument."""
        data = wire.require_object(data, "last_checkpoint")
        return cls(
            step=wire.get_int(data, "step"),
            uri=wire.get_str(data, "uri", max_chars=MAX_URI_CHARS),
            sha256=_get_sha256(data),
            size_bytes=wire.get_int(data, "size_bytes"),
        )


@dataclass(frozen=True)
class Report:
    """One message from a worker to the supervisor, by HTTP or through the mailbox object."""

    job_id: str
    attempt: int
    kind: ReportKind
    step: int
    total_steps: int
    sent_at: float
    last_checkpoint: CheckpointRef | None = None
    checkpointing_step: int | None = None
    resumed_from_step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    # FAILED reports: the worker's exit code. EXIT_BAD_CHECKPOINT means a restart cannot help.
    exit_code: int | None = None
    protocol_version: int = PROTOCOL_VERSION

    def to_json(self) -> str:
        """Encode the report as strict JSON, which from_json requires: non-finite metrics
        become null and an error longer than wire.MAX_TEXT_CHARS is cut."""
        data = asdict(self)
        data["metrics"] = wire.encode_metrics(self.metrics)
        if self.error is not None and len(self.error) > wire.MAX_TEXT_CHARS:
            data["error"] = self.error[: wire.MAX_TEXT_CHARS - 3] + "..."
        return json.dumps(data, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> Report:
        """Parse a report body, or raise InvalidReport with a one-line message."""
        try:
            return cls._parse(wire.load_object(text, MAX_REPORT_BYTES))
        except wire.InvalidDocument as exc:
            raise InvalidReport(f"invalid report: {exc}") from None

    @classmethod
    def from_dict(cls, data: Any) -> Report:
        """Parse a decoded report, or raise InvalidReport naming the missing or invalid field."""
        try:
            return cls._parse(wire.require_object(data, "report"))
        except wire.InvalidDocument as exc:
            raise InvalidReport(f"invalid report: {exc}") from None

    @classmethod
    def _parse(cls, data: dict[str, Any]) -> Report:
        checkpoint = data.get("last_checkpoint")
        kind = wire.get_str(data, "kind")
        if kind not in ReportKind.__members__.values():
            raise wire.InvalidDocument(f"kind={kind[:60]!r} is not a report kind")
        error = data.get("error")
        if error is not None:
            error = wire.get_str(data, "error", min_chars=0, max_chars=wire.MAX_TEXT_CHARS)
        return cls(
            job_id=wire.get_str(data, "job_id"),
            attempt=wire.get_int(data, "attempt"),
            kind=ReportKind(kind),
            step=wire.get_int(data, "step"),
            total_steps=wire.get_int(data, "total_steps"),
            sent_at=wire.get_float(data, "sent_at"),
            last_checkpoint=None if checkpoint is None else CheckpointRef.from_dict(checkpoint),
            checkpointing_step=wire.get_optional_int(data, "checkpointing_step"),
            resumed_from_step=wire.get_optional_int(data, "resumed_from_step"),
            metrics=wire.get_metrics(data),
            error=error,
            exit_code=wire.get_optional_int(data, "exit_code", maximum=255),
            protocol_version=wire.get_int(data, "protocol_version", PROTOCOL_VERSION),
        )


@dataclass(frozen=True)
class CheckpointManifest:
    """Written after the payload; a checkpoint without a matching manifest does not exist."""

    step: int
    sha256: str
    size_bytes: int
    created_at: float
    payload: str = PAYLOAD_NAME
    format_version: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> CheckpointManifest:
        """Parse a manifest, or raise InvalidManifest with a one-line message."""
        try:
            data = wire.load_object(text, MAX_MANIFEST_BYTES)
            return cls(
                step=wire.get_int(data, "step"),
                sha256=_get_sha256(data),
                size_bytes=wire.get_int(data, "size_bytes"),
                created_at=wire.get_float(data, "created_at"),
                payload=_get_file_name(data, "payload", PAYLOAD_NAME),
                format_version=wire.get_int(data, "format_version", 1),
            )
        except wire.InvalidDocument as exc:
            raise InvalidManifest(f"invalid checkpoint manifest: {exc}") from None


@dataclass(frozen=True)
class CompletionMarker:
    """Stored last, once the final model and metrics are durable; the job never reruns after it."""

    job_id: str
    attempt: int
    step: int
    completed_at: float
    metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        """Encode the marker as strict JSON, writing a non-finite metric as null."""
        data = asdict(self)
        data["metrics"] = wire.encode_metrics(self.metrics)
        return json.dumps(data, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> CompletionMarker:
        """Parse a marker, or raise InvalidCompletionMarker (a ValueError) for any invalid one.

        Metrics that are null (as to_json writes them) or not finite (as NaN, Infinity or 1e400,
        which older workers wrote) are left out, so a job that completed stays completed.
        """
        try:
            data = wire.load_object(text, MAX_MARKER_BYTES, allow_constants=True)
            return cls(
                job_id=wire.get_str(data, "job_id"),
                attempt=wire.get_int(data, "attempt"),
                step=wire.get_int(data, "step"),
                completed_at=wire.get_float(data, "completed_at"),
                metrics=wire.get_metrics(data, drop_non_finite=True),
            )
        except wire.InvalidDocument as exc:
            raise InvalidCompletionMarker(f"invalid completion marker: {exc}") from None


def _get_sha256(data: dict[str, Any]) -> str:
    digest = wire.get_str(data, "sha256")
    if not _SHA256_HEX.match(digest):
        raise wire.InvalidDocument("sha256 must be 64 lowercase hexadecimal digits")
    return digest


def _get_file_name(data: dict[str, Any], name: str, default: str) -> str:
    """Return field name as a plain file name, because a path such as '../x' leaves its folder."""
    value = wire.get_str(data, name, default)
    if "/" in value or "\\" in value or value in (".", ".."):
        raise wire.InvalidDocument(f"{name}={value[:60]!r} must be a file name, not a path")
    return value
