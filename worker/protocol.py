"""Wire contract between the orchestrator and a worker: environment, reports, manifests.

The orchestrator imports this module; the worker image needs nothing else of the
orchestrator. Every format here carries a version so either side can be upgraded first.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from typing import Any

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
EXIT_BAD_CHECKPOINT = 76  # a checkpoint exists but cannot be loaded; restarting will not help
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
    def from_dict(cls, data: dict[str, Any]) -> CheckpointRef:
        return cls(
            step=int(data["step"]),
            uri=str(data["uri"]),
            sha256=str(data["sha256"]),
            size_bytes=int(data["size_bytes"]),
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
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Parse a report; raises ValueError naming the field that is missing or invalid."""
        try:
            checkpoint = data.get("last_checkpoint")
            return cls(
                job_id=str(data["job_id"]),
                attempt=int(data["attempt"]),
                kind=ReportKind(data["kind"]),
                step=int(data["step"]),
                total_steps=int(data["total_steps"]),
                sent_at=float(data["sent_at"]),
                last_checkpoint=CheckpointRef.from_dict(checkpoint) if checkpoint else None,
                checkpointing_step=_optional_int(data.get("checkpointing_step")),
                resumed_from_step=_optional_int(data.get("resumed_from_step")),
                metrics={str(k): float(v) for k, v in (data.get("metrics") or {}).items()},
                error=data.get("error"),
                exit_code=_optional_int(data.get("exit_code")),
                protocol_version=int(data.get("protocol_version", PROTOCOL_VERSION)),
            )
        except KeyError as exc:
            raise ValueError(f"report is missing the field {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            raise ValueError(f"report has an invalid field: {exc}") from exc


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
        """Parse a manifest; raises ValueError when it is not one."""
        try:
            data = json.loads(text)
            return cls(
                step=int(data["step"]),
                sha256=str(data["sha256"]),
                size_bytes=int(data["size_bytes"]),
                created_at=float(data["created_at"]),
                payload=str(data.get("payload", PAYLOAD_NAME)),
                format_version=int(data.get("format_version", 1)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid checkpoint manifest: {exc}") from exc


@dataclass(frozen=True)
class CompletionMarker:
    """Stored last, once the final model and metrics are durable; the job never reruns after it."""

    job_id: str
    attempt: int
    step: int
    completed_at: float
    metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> CompletionMarker:
        try:
            data = json.loads(text)
            return cls(
                job_id=str(data["job_id"]),
                attempt=int(data["attempt"]),
                step=int(data["step"]),
                completed_at=float(data["completed_at"]),
                metrics={str(k): float(v) for k, v in (data.get("metrics") or {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid completion marker: {exc}") from exc


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)
