"""Usage errors from the command-line parser, and job values that would only fail on a machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

GPUJOBS = [str(Path(sys.executable).with_name("gpujobs"))]  # the installed script, as users run it


def run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, GPUJOBS_HOME=str(tmp_path / "home"), COLUMNS="120")
    return subprocess.run([*GPUJOBS, *args], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["status", "--bogus"], "No such option: --bogus"),
        (["cancel"], "Missing argument 'job_id'."),
        (["submit", "--total-steps", "abc"], "Invalid value for '--total-steps'"),
        (["submit", "--profile", "dev-test", "--total-steps", "-5"],
         "Invalid value for '--total-steps': Input should be greater than or equal to 1"),
        (["submit", "--profile", "dev-test", "--total-steps", "0"],
         "Invalid value for '--total-steps'"),
    ],
)
def test_parser_errors_show_usage(tmp_path: Path, args: list[str], message: str) -> None:
    done = run(args, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"Usage: gpujobs {args[0]}" in done.stderr
    assert message in done.stderr
    assert not (tmp_path / "home" / "journal.db").exists()


def test_no_command_prints_help(tmp_path: Path) -> None:
    done = run([], tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stdout + done.stderr
    assert "submit" in done.stdout + done.stderr
    assert "supervise" in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("seed: 100000000000000000000000000\n",
         "job spec: seed: must be at most 4294967295, got 100000000000000000000000000"),
        ("seed: -1\n", "job spec: seed: must be at least 0, got -1"),
        ('env:\n  FOO: "a\\u0000b"\n',
         "job spec: env: FOO: contains a NUL character, which no process environment can "
         "hold; remove it"),
    ],
)
def test_spec_values_rejected_at_submit(tmp_path: Path, spec: str, fragment: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("name: x\nprofile: dev-test\n" + spec)
    done = run(["submit", str(path)], tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: {path}:")
    assert lines[0].endswith(fragment)
