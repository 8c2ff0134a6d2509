"""Expected errors: one line that names the value and the fix, exit code 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

GPUJOBS = [sys.executable, "-m", "gpujobs.cli"]


def run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ, GPUJOBS_HOME=str(tmp_path / "home"), **env)
    return subprocess.run([*GPUJOBS, *args], env=full_env, capture_output=True, text=True,
                          timeout=60)


def assert_one_line_error(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_profile_name(tmp_path: Path) -> None:
    done = run(["submit", "--profile", "no-such-profile"], tmp_path)
    assert_one_line_error(done, "'no-such-profile'", "dev-test", "gpujobs profiles")


def test_malformed_profile_file(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "gpu_profiles.yaml").write_text("profiles:\n  broken: [unclosed\n")
    done = run(["profiles"], tmp_path, GPUJOBS_CONFIG_DIR=str(config))
    assert_one_line_error(done, "gpu_profiles.yaml", "invalid YAML")


def test_profile_with_wrong_type_names_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "gpu_profiles.yaml"
    path.write_text(
        "profiles:\n  p:\n    gpu_name: RTX_4090\n    num_gpus: two\n    max_dph: 0.2\n"
        "    reliability_min: 0.9\n    max_duration_hours: 1\n"
    )
    done = run(["profiles", "validate", str(path)], tmp_path)
    assert_one_line_error(done, f"{path}:4", "num_gpus", "whole number")


def test_missing_profile_file(tmp_path: Path) -> None:
    done = run(["profiles", "validate", str(tmp_path / "absent.yaml")], tmp_path)
    assert_one_line_error(done, "absent.yaml", "not found")


def test_missing_config_folder(tmp_path: Path) -> None:
    done = run(["profiles"], tmp_path, GPUJOBS_CONFIG_DIR=str(tmp_path / "nowhere"))
    assert_one_line_error(done, "nowhere", "GPUJOBS_CONFIG_DIR")


def test_job_spec_with_wrong_field(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("name: mnist\nprofile: dev-test\ntotal_step: 100\n")
    done = run(["submit", str(spec)], tmp_path)
    assert_one_line_error(done, f"{spec}:3", "total_step", "unknown key")


def test_job_spec_with_bad_value(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("name: mnist\nprofile: dev-test\ntotal_steps: -5\n")
    done = run(["submit", str(spec)], tmp_path)
    assert_one_line_error(done, "total_steps", "at least 1", "-5")


def test_replay_of_unknown_job(tmp_path: Path) -> None:
    done = run(["replay", "--job", "nope-123"], tmp_path)
    assert_one_line_error(done, "'nope-123'", "gpujobs status")


def test_submit_then_status_lists_the_job(tmp_path: Path) -> None:
    done = run(["submit", "--profile", "dev-test", "--name", "mnist", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    listed = run(["status", "--json"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert '"state": "queued"' in listed.stdout
    assert '"profile": "dev-test"' in listed.stdout
