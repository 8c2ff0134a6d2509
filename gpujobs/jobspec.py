"""Job specs: what a user submits. Read from a YAML file or built from CLI flags."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpujobs.errors import ConfigError
from gpujobs.yamlfile import FieldReader, Located, load_yaml, plain

DEFAULT_COMMAND = "gpujobs-worker train-digits"
SPEC_KEYS = {
    "name", "profile", "team", "project", "priority", "command", "image", "total_steps",
    "checkpoint_every", "keep_checkpoints", "grace_period_s", "step_delay_s", "env",
    "heartbeat_interval_s", "seed",
}
MAX_SEED = 2**32 - 1  # NumPy's legacy seeding, which the worker uses, takes 0..2**32 - 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# The GPUJOBS_ variables a job may set itself: inputs of the worker that gpujobs never sets.
JOB_SETTABLE_ENV = ("GPUJOBS_DATASET_URI", "GPUJOBS_MODEL_URI", "GPUJOBS_CACHE_DIR")


@dataclass(frozen=True)
class JobSpec:
    name: str
    profile: str
    team: str = "default"
    project: str = "default"
    priority: int = 0
    command: str = DEFAULT_COMMAND  # run on the instance through /bin/sh -c
    image: str | None = None  # None: the profile's image
    total_steps: int = 600
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    grace_period_s: float = 10.0
    step_delay_s: float = 0.0
    heartbeat_interval_s: float = 2.0
    seed: int = 0
    env: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def check_name(value: str, what: str) -> str:
    if not _NAME.match(value):
        raise ConfigError(
            f"invalid {what} {value!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def parse_spec(mapping: Located, overrides: Mapping[str, Any] | None = None) -> JobSpec:
    """Build a JobSpec from a spec file's mapping; `overrides` replace its values.

    A key in `overrides` need not be in the file, even one the file must otherwise have.
    """
    overrides = overrides or {}
    fields = FieldReader(mapping, "job spec")
    env = fields.raw("env")
    spec = JobSpec(
        name=fields.string("name", required="name" not in overrides) or "",
        profile=fields.string("profile", required="profile" not in overrides) or "",
        team=fields.string("team", required=False, default="default") or "default",
        project=fields.string("project", required=False, default="default") or "default",
        priority=fields.integer("priority", required=False, default=0, minimum=-1000,
                                maximum=1000) or 0,
        command=fields.string("command", required=False, default=DEFAULT_COMMAND) or "",
        image=fields.string("image", required=False),
        total_steps=fields.integer("total_steps", required=False, default=600, minimum=1) or 1,
        checkpoint_every=fields.integer("checkpoint_every", required=False, default=50,
                                        minimum=1) or 1,
        keep_checkpoints=fields.integer("keep_checkpoints", required=False, default=3,
                                        minimum=1) or 1,
        grace_period_s=fields.number("grace_period_s", required=False, default=10.0,
                                     minimum=0.0, maximum=3600.0) or 0.0,
        step_delay_s=fields.number("step_delay_s", required=False, default=0.0, minimum=0.0,
                                   maximum=60.0) or 0.0,
        heartbeat_interval_s=fields.number("heartbeat_interval_s", required=False, default=2.0,
                                           minimum=0.05) or 2.0,
        seed=fields.integer("seed", required=False, default=0, minimum=0,
                            maximum=MAX_SEED) or 0,
        env=_parse_env(env, mapping),
    )
    fields.reject_unknown(SPEC_KEYS)
    spec = dataclasses.replace(spec, **overrides)
    for key, value, what in (("name", spec.name, "job name"), ("team", spec.team, "team"),
                             ("project", spec.project, "project")):
        try:
            check_name(value, what)
        except ConfigError as exc:
            raise ConfigError(f"job spec: {key}: {exc}", path=mapping.path,
                              line=mapping.line_of(key), key=key) from None
    return spec


def _parse_env(value: Any, mapping: Located) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Located):
        raise ConfigError(
            "job spec: env: expected a mapping of NAME: value",
            path=mapping.path, line=mapping.line_of("env"), key="env",
        )
    env = plain(value)
    for key, item in env.items():
        if not _ENV_KEY.match(key) or (key.startswith("GPUJOBS_") and key not in JOB_SETTABLE_ENV):
            raise ConfigError(
                f"job spec: env: invalid variable name {key!r}; use letters, digits and '_', "
                "and leave the GPUJOBS_ prefix to gpujobs (except "
                f"{', '.join(JOB_SETTABLE_ENV)})",
                path=mapping.path, line=value.line_of(key), key=key,
            )
        if not isinstance(item, (str, int, float)) or isinstance(item, bool):
            raise ConfigError(
                f"job spec: env: {key}: expected a string or number, got {item!r}",
                path=mapping.path, line=value.line_of(key), key=key,
            )
        if "\x00" in str(item):
            raise ConfigError(
                f"job spec: env: {key}: contains a NUL character, which no process environment "
                "can hold; remove it",
                path=mapping.path, line=value.line_of(key), key=key,
            )
        env[key] = str(item)
    return env


def load_spec(path: Path, overrides: Mapping[str, Any] | None = None) -> JobSpec:
    """Read and check a job spec file; raises ConfigError naming file, line and key.

    `overrides` replace the file's values (see parse_spec).
    """
    document = load_yaml(path)
    if not isinstance(document, Located):
        raise ConfigError("expected a mapping of job settings (name, profile, ...)", path=str(path))
    return parse_spec(document, overrides)
