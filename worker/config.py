"""Worker settings, read once from the environment variables the orchestrator sets."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from worker import protocol
from worker.errors import ConfigError
from worker.wire import MAX_WIRE_INT

ENV_REPORT_MODE = "GPUJOBS_REPORT_MODE"  # "mailbox" forces reports through the storage
ENV_CHECKPOINT_DIR = "GPUJOBS_CHECKPOINT_DIR"  # wrapper mode: local folder given to the child
ENV_DEVICE = "GPUJOBS_DEVICE"  # optional: "cpu" or "cuda"; default cuda when available

T = TypeVar("T")
_DEVICE = re.compile(r"^(cpu|cuda|cuda:\d{1,3})$")


@dataclass(frozen=True)
class WorkerConfig:
    """Everything the worker reads from its environment."""

    job_id: str
    attempt: int
    artifact_uri: str
    supervisor_url: str | None = None
    token: str = ""
    report_mode: str = ""
    heartbeat_interval_s: float = 2.0
    total_steps: int = 600
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    grace_period_s: float = 10.0
    step_delay_s: float = 0.0
    seed: int = 0
    checkpoint_dir: str | None = None
    device: str | None = None
    num_gpus: int = 1
    log_upload_interval_s: float = 10.0

    def __repr__(self) -> str:  # keeps the token out of logs and tracebacks
        return f"WorkerConfig(job_id={self.job_id!r}, attempt={self.attempt})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerConfig:
        """Read the configuration; raises ConfigError naming the variable and the fix."""
        env = os.environ if env is None else env
        config = cls(
            job_id=_required(env, protocol.ENV_JOB_ID),
            attempt=_number(env, protocol.ENV_ATTEMPT, int, 1, minimum=1),
            artifact_uri=_required(env, protocol.ENV_ARTIFACT_URI),
            supervisor_url=env.get(protocol.ENV_SUPERVISOR_URL) or None,
            token=env.get(protocol.ENV_JOB_TOKEN, ""),
            report_mode=env.get(ENV_REPORT_MODE, "").strip().lower(),
            heartbeat_interval_s=_number(env, protocol.ENV_HEARTBEAT_INTERVAL_S, float, 2.0),
            total_steps=_number(env, protocol.ENV_TOTAL_STEPS, int, 600, minimum=1),
            checkpoint_every=_number(env, protocol.ENV_CHECKPOINT_EVERY, int, 50, minimum=1),
            keep_checkpoints=_number(env, protocol.ENV_KEEP_CHECKPOINTS, int, 3, minimum=1),
            grace_period_s=_number(env, protocol.ENV_GRACE_PERIOD_S, float, 10.0, minimum=0),
            step_delay_s=_number(env, protocol.ENV_STEP_DELAY_S, float, 0.0, minimum=0),
            seed=_number(env, protocol.ENV_SEED, int, 0, minimum=0),
            checkpoint_dir=env.get(ENV_CHECKPOINT_DIR) or None,
            device=env.get(ENV_DEVICE) or None,
            num_gpus=_number(env, protocol.ENV_NUM_GPUS, int, 1, minimum=1),
            log_upload_interval_s=_number(
                env, protocol.ENV_LOG_UPLOAD_INTERVAL_S, float, 10.0, minimum=0.1
            ),
        )
        if config.report_mode not in ("", "http", "mailbox"):
            raise ConfigError(
                f"invalid {ENV_REPORT_MODE}={config.report_mode!r}: use 'http' or 'mailbox'"
            )
        if config.heartbeat_interval_s <= 0:
            raise ConfigError(
                f"invalid {protocol.ENV_HEARTBEAT_INTERVAL_S}={config.heartbeat_interval_s:g}: "
                "must be a positive number of seconds"
            )
        if config.device is not None and not _DEVICE.match(config.device):
            raise ConfigError(
                f"invalid {ENV_DEVICE}={config.device[:60]!r}: use 'cpu', 'cuda' or 'cuda:N'"
            )
        return config


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigError(f"missing environment variable {name}: the orchestrator sets it")
    return value


def _number(
    env: Mapping[str, str],
    name: str,
    kind: Callable[[str], T],
    default: T,
    minimum: float | None = None,
) -> T:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(
            f"invalid {name}={raw!r}: expected {'an integer' if kind is int else 'a number'}"
        ) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"invalid {name}={raw!r}: expected a finite number")
    if minimum is not None and value < minimum:  # type: ignore[operator]
        raise ConfigError(f"invalid {name}={raw!r}: must be at least {minimum:g}")
    if value > MAX_WIRE_INT:  # type: ignore[operator]
        raise ConfigError(f"invalid {name}={raw!r}: must be at most {MAX_WIRE_INT}")
    return value
