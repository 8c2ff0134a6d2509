"""train-digits on 2 ranks under torchrun (gloo on CPU): preemption by SIGTERM, then resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.worker.processes import WorkerProcess, run_worker, worker_env
from worker import protocol
from worker.distributed import (
    ENV_RANK_RESULT_DIR,
    RankInfo,
    read_rank_exit_code,
    torchrun_command,
    write_rank_exit_code,
)

TOTAL_STEPS = "80"
RANKS = {"GPUJOBS_NUM_GPUS": "2", "GPUJOBS_TOTAL_STEPS": TOTAL_STEPS,
         "GPUJOBS_CHECKPOINT_EVERY": "20", "GPUJOBS_REPORT_MODE": "mailbox"}  # fmt: skip
LEADER_STOPPING = r"^\d.* job job-test attempt \d stopping at step (\d+)"
FOLLOWER_STOPPING = r"^\[rank 1\] .* rank 1 stopping at step (\d+)"


def rank_env(store: Path, attempt: int = 1, **overrides: str) -> dict[str, str]:
    return worker_env(store, attempt, **{**RANKS, **overrides})


def steps(worker: WorkerProcess, pattern: str) -> list[int]:
    return [int(match.group(1)) for match in worker.find(pattern)]


def test_rank_info_from_env() -> None:
    assert RankInfo.from_env({}) is None
    assert RankInfo.from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None

    rank = RankInfo.from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"})

    assert rank == RankInfo(rank=2, world_size=4, local_rank=0)
    assert not rank.is_leader


def test_rank_exit_code_file(tmp_path: Path) -> None:
    rank = RankInfo(rank=1, world_size=2, local_rank=1)

    assert write_rank_exit_code(rank, 75, {}) == 75
    assert write_rank_exit_code(rank, 75, {ENV_RANK_RESULT_DIR: str(tmp_path)}) == 0
    assert read_rank_exit_code(tmp_path, 1) == 75
    assert read_rank_exit_code(tmp_path, 0) is None


def test_torchrun_command_runs_module() -> None:
    command = torchrun_command(2, ["worker.cli", "train-digits"])

    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in command
    assert command[-3:] == ["-m", "worker.cli", "train-digits"]


@pytest.mark.timeout(240)
def test_two_ranks_preempted_and_resumed(tmp_path: Path) -> None:
    store = tmp_path / "store"
    worker = WorkerProcess(["train-digits"], rank_env(store, GPUJOBS_STEP_DELAY_S="0.05"))
    try:
        worker.wait_for_line(r"checkpoint at step 20 durable", timeout_s=120)
        worker.process.send_signal(signal.SIGTERM)
        worker.wait(90)
    finally:
        worker.kill()

    assert worker.process.returncode == protocol.EXIT_PREEMPTED, worker.output()
    stopped = steps(worker, LEADER_STOPPING)
    assert len(stopped) == 1, worker.output()
    assert steps(worker, FOLLOWER_STOPPING) == stopped
    assert 20 <= stopped[0] < int(TOTAL_STEPS)
    assert len(worker.find(r"checkpoint at step %d durable" % stopped[0])) == 1
    assert (store / protocol.checkpoint_prefix(stopped[0]) / protocol.MANIFEST_NAME).is_file()

    resumed = run_worker(["train-digits"], rank_env(store, attempt=2), timeout_s=150)

    assert resumed.process.returncode == protocol.EXIT_OK, resumed.output()
    assert resumed.find(r"started at step (\d+) of 80 \(resumed from step (\d+)\)")[0].groups() == (
        str(stopped[0]), str(stopped[0])
    )
    assert steps(resumed, r"\[rank 1\] .* rank 1 restored checkpoint at step (\d+)") == stopped
    marker = protocol.CompletionMarker.from_json((store / protocol.COMPLETION_MARKER).read_bytes())
    assert marker.attempt == 2
    assert marker.step == int(TOTAL_STEPS)
    assert json.loads((store / "final/metrics.json").read_text())["test_accuracy"] > 0.8


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(child) for child in found.stdout.split()]


def alive(pid: int) -> bool:
    """Return whether pid runs; a zombie, waiting for init to reap it, counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(180)
def test_ranks_exit_when_agent_killed(tmp_path: Path) -> None:
    env = rank_env(tmp_path / "store", GPUJOBS_STEP_DELAY_S="0.05", GPUJOBS_TOTAL_STEPS="2000")
    worker = WorkerProcess(["train-digits"], env)
    ranks: list[int] = []
    try:
        worker.wait_for_line(r"started at step 0", timeout_s=120)
        agents = children(worker.process.pid)
        assert len(agents) == 1
        ranks = children(agents[0])
        assert len(ranks) == 2
        os.kill(agents[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(pid) for pid in ranks):
            time.sleep(0.2)

        assert not any(alive(pid) for pid in ranks)
        assert worker.wait(30) == protocol.EXIT_FAILED
    finally:
        worker.kill()
        for pid in filter(alive, ranks):  # only when the test failed
            os.kill(pid, signal.SIGKILL)
