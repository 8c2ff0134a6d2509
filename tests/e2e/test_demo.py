"""The end-to-end flow: a real digits job on the emulator, preempted once, resumed, finished."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from journal import verify_file

REQUIRED_STATES = {"queued", "provisioning", "running", "checkpointing", "preempted", "resumed",
                   "done"}
GPUJOBS = [sys.executable, "-m", "gpujobs.cli"]


def check_summary(summary: dict) -> None:
    assert summary["state"] == "done"
    assert REQUIRED_STATES <= set(summary["states_visited"])
    assert summary["states_visited"][0] == "queued"
    assert summary["states_visited"][-1] == "done"
    assert summary["preemptions"] == 1
    assert summary["attempts"] == 2
    assert summary["resumed_from_step"] > 0
    assert summary["resumed_from_step"] == summary["last_checkpoint_step_before_preemption"]
    assert summary["test_accuracy"] >= 0.95
    assert summary["instances_alive_at_end"] == 0
    assert summary["cost_usd"] > 0
    assert summary["cost_usd"] == pytest.approx(summary["emulator_charges_usd"], rel=0.03)


TRANSITION_LINE = re.compile(
    r"^\d\d:\d\d:\d\d  job (?P<job>[\w-]+) attempt (?P<attempt>\d+): "
    r"(?P<before>\w+) -> (?P<after>\w+) \((?P<event>\w+)\)$"
)


@pytest.mark.timeout(300)
def test_demo_prints_transitions(tmp_path: Path) -> None:
    """`gpujobs demo` without GPUJOBS_HOME: names its new folder and prints every transition."""
    env = {key: value for key, value in os.environ.items() if key != "GPUJOBS_HOME"}
    env["TMPDIR"] = str(tmp_path)
    env["PATH"] = "/usr/bin:/bin"  # as after `make demo`: the virtual environment is not on PATH
    done = subprocess.run(
        [*GPUJOBS, "demo", "--step-delay-s", "0.01"],
        env=env, capture_output=True, text=True, timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()

    home = Path(re.search(r"^gpujobs demo: state in (\S+)$", done.stdout, re.M).group(1))
    assert home.parent == tmp_path.resolve()
    assert home.name.startswith("gpujobs-demo-")
    assert (home / "journal.db").is_file()

    transitions = [m.groupdict() for m in map(TRANSITION_LINE.match, lines) if m]
    visited = {t["after"] for t in transitions}
    assert REQUIRED_STATES - {"queued"} <= visited
    assert transitions[-1]["after"] == "done"
    assert {t["attempt"] for t in transitions} == {"1", "2"}
    assert len({t["job"] for t in transitions}) == 1

    resumed = re.search(r"last durable checkpoint before the preemption: step (\d+); "
                        r"resumed from step (\d+)$", done.stdout, re.M)
    assert resumed is not None, done.stdout
    assert int(resumed.group(1)) == int(resumed.group(2)) > 0
    accuracy = re.search(r"held-out accuracy: (\d\.\d+)$", done.stdout, re.M)
    assert float(accuracy.group(1)) >= 0.95
    assert re.search(r"instances alive: 0$", done.stdout, re.M)

    # The printed replay command works after the demo has exited.
    command = re.search(r"replay it: (.+)$", done.stdout, re.M).group(1)
    assert command.startswith(f"GPUJOBS_HOME={home} ")
    assert command.endswith(f"gpujobs replay --job {transitions[0]['job']}")
    replayed = subprocess.run(
        f"{command} --json", shell=True, env=env, capture_output=True, text=True, timeout=60,
    )
    assert replayed.returncode == 0, replayed.stderr
    replay = json.loads(replayed.stdout)
    assert replay["state"] == "done"
    assert [(t["from"], t["to"]) for t in replay["transitions"]] == [
        (t["before"], t["after"]) for t in transitions
    ]
    assert verify_file(home / "journal.db").ok
    replay_env = dict(env, GPUJOBS_HOME=str(home))
    checked = subprocess.run([*GPUJOBS, "replay", "--all", "--check"], env=replay_env,
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.timeout(300)
def test_demo_command_and_replay(tmp_path: Path) -> None:
    env = dict(os.environ, GPUJOBS_HOME=str(tmp_path / "home"))
    done = subprocess.run(
        [*GPUJOBS, "demo", "--json", "--step-delay-s", "0.01"],
        env=env, capture_output=True, text=True, timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    check_summary(summary)
    assert summary["replay_command"].endswith(f"gpujobs replay --job {summary['job_id']}")

    replayed = subprocess.run(
        [*GPUJOBS, "replay", "--job", summary["job_id"], "--json"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert replayed.returncode == 0, replayed.stderr
    replay = json.loads(replayed.stdout)
    assert replay["job_id"] == summary["job_id"]
    assert replay["state"] == "done"
    assert replay["attempts"] == 2
    assert [t["to"] for t in replay["transitions"]][-1] == "done"
    for transition in replay["transitions"]:
        assert set(transition) >= {"from", "to", "event", "at"}

    verified = subprocess.run([*GPUJOBS, "audit", "verify"], env=env, capture_output=True,
                              text=True, timeout=60)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith("ok:")
