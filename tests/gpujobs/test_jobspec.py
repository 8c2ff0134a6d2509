"""Strict validation of job spec files: every error names file, line, key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpujobs.errors import ConfigError
from gpujobs.jobspec import load_spec

BASE = "name: digits\nprofile: dev-test\nteam: research\nproject: digits\ntotal_steps: 100\n"
KEYS = ("checkpoint_every, command, env, grace_period_s, heartbeat_interval_s, image, "
        "keep_checkpoints, name, priority, profile, project, seed, step_delay_s, team, "
        "total_steps")

CASES = [
    ("unknown key", BASE + "steps: 3\n", "6: job spec: steps: unknown key; expected one of: "
     + KEYS),
    ("duplicate key", BASE + "team: x\n",
     "6: duplicate key 'team' (first at line 3); keep only one"),
    ("yaml 1.1 boolean", BASE.replace("team: research", "team: no"),
     "3: job spec: team: expected a non-empty string, got the boolean false (YAML reads "
     "yes/no/on/off as booleans; quote it)"),
    ("whole float", BASE.replace("total_steps: 100", "total_steps: 1e3"),
     "5: job spec: total_steps: expected a whole number, got float 1000.0; write 1000"),
    ("quoted number", BASE + 'step_delay_s: "0.1"\n',
     "6: job spec: step_delay_s: expected a number, got the string '0.1'; remove the quotes"),
    ("word for number", BASE + "step_delay_s: fast\n",
     "6: job spec: step_delay_s: expected a number, got the string 'fast'"),
    ("out of range", BASE + "step_delay_s: 61\n",
     "6: job spec: step_delay_s: must be at most 60, got 61"),
    ("nan grace", BASE + "grace_period_s: .nan\n",
     "6: grace_period_s: expected a finite number, got .nan"),
    ("infinite grace", BASE + "grace_period_s: +.inf\n",
     "6: grace_period_s: expected a finite number, got +.inf"),
    ("base 60 steps", BASE.replace("total_steps: 100", "total_steps: 1:30"),
     "5: total_steps: YAML 1.1 reads 1:30 as the base-60 number 90; write 90, or quote "
     "'1:30' for a string"),
    ("octal steps", BASE.replace("total_steps: 100", "total_steps: 010"),
     "5: total_steps: YAML 1.1 reads 010 as the octal number 8; write 10 without the "
     "leading zero, or quote '010' for a string"),
    ("octal env value", BASE + "env:\n  PORT: 0755\n",
     "7: PORT: YAML 1.1 reads 0755 as the octal number 493; write 755 without the leading "
     "zero, or quote '0755' for a string"),
    ("too few steps", BASE.replace("total_steps: 100", "total_steps: 0"),
     "5: job spec: total_steps: must be at least 1, got 0"),
    ("priority range", BASE + "priority: 5000\n",
     "6: job spec: priority: must be at most 1000, got 5000"),
    ("bad team name", BASE.replace("team: research", "team: -x"),
     "3: job spec: team: invalid team '-x': use 1-63 letters, digits, '.', '_' or '-', "
     "starting with a letter or digit"),
    ("reserved env name", BASE + "env:\n  GPUJOBS_X: 1\n",
     "7: job spec: env: invalid variable name 'GPUJOBS_X'; use letters, digits and '_', and "
     "leave the GPUJOBS_ prefix to gpujobs (except GPUJOBS_DATASET_URI, GPUJOBS_MODEL_URI, "
     "GPUJOBS_CACHE_DIR)"),
    ("env list value", BASE + "env:\n  A: [1]\n",
     "7: job spec: env: A: expected a string or number, got [1]"),
    ("env not mapping", BASE + "env: 3\n", "6: job spec: env: expected a mapping of NAME: value"),
    ("missing profile", "name: d\n", "1: job spec: missing required key 'profile'"),
]


@pytest.mark.parametrize("text, expected", [(t, e) for _, t, e in CASES],
                         ids=[name for name, _, _ in CASES])
def test_spec_error_message(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_spec(path)
    assert str(caught.value) == f"{path}:{expected}"


def test_spec_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("- a\n")
    with pytest.raises(ConfigError) as caught:
        load_spec(path)
    assert str(caught.value) == f"{path}: expected a mapping of job settings (name, profile, ...)"


def test_spec_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as caught:
        load_spec(path)
    assert str(caught.value) == f"{path}: file not found; create it or pass the right path"


def test_spec_reads_every_field(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(BASE + "step_delay_s: 1e-3\npriority: -2\nenv:\n  LR: '0.1'\n  N: 4\n")
    spec = load_spec(path)
    assert spec.team == "research"
    assert spec.project == "digits"
    assert spec.step_delay_s == 0.001
    assert spec.priority == -2
    assert spec.env == {"LR": "0.1", "N": "4"}


def test_spec_env_sets_worker_inputs(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(BASE + "env:\n  GPUJOBS_DATASET_URI: file:///data/sha256-ab\n"
                    "  GPUJOBS_MODEL_URI: s3://models/m.pt\n")
    spec = load_spec(path)
    assert spec.env == {"GPUJOBS_DATASET_URI": "file:///data/sha256-ab",
                        "GPUJOBS_MODEL_URI": "s3://models/m.pt"}


def test_spec_defaults_team_and_project(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("name: d\nprofile: dev-test\n")
    spec = load_spec(path)
    assert (spec.team, spec.project) == ("default", "default")
