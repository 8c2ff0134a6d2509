"""Run `python -m worker.cli` as a real subprocess and follow its log lines."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def worker_env(store: Path, attempt: int = 1, **overrides: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("GPUJOBS_") and not key.startswith("AWS_")
    }
    env.update(
        {
            "GPUJOBS_JOB_ID": "job-test",
            "GPUJOBS_ATTEMPT": str(attempt),
            "GPUJOBS_ARTIFACT_URI": f"file://{store}",
            "GPUJOBS_TOTAL_STEPS": "200",
            "GPUJOBS_CHECKPOINT_EVERY": "50",
            "GPUJOBS_HEARTBEAT_INTERVAL_S": "0.2",
            "GPUJOBS_DEVICE": "cpu",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides)
    return env


class WorkerProcess:
    """A worker subprocess whose combined output is collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str], new_session: bool = False) -> None:
        """Start the worker; new_session makes it a process group leader, for os.killpg."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=new_session,
        )
        self.lines: list[str] = []
        self._new_lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            self._new_lines.put(line)
        self._new_lines.put(None)

    def wait_for_line(self, pattern: str, timeout_s: float = 60) -> re.Match[str]:
        """Block until a new output line matches pattern; raise AssertionError otherwise."""
        compiled = re.compile(pattern)
        for line in self.lines:
            if match := compiled.search(line):
                return match
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._new_lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                break
            if match := compiled.search(line):
                return match
        raise AssertionError(f"no line matched {pattern!r}; output:\n" + self.output())

    def wait(self, timeout_s: float = 90) -> int:
        code = self.process.wait(timeout_s)
        self._reader.join(5)
        return code

    def output(self) -> str:
        return "\n".join(self.lines)

    def find(self, pattern: str) -> list[re.Match[str]]:
        compiled = re.compile(pattern)
        return [match for line in self.lines if (match := compiled.search(line))]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def run_worker(args: list[str], env: dict[str, str], timeout_s: float = 90) -> WorkerProcess:
    worker = WorkerProcess(args, env)
    try:
        worker.wait(timeout_s)
    finally:
        worker.kill()
    return worker


def signal_after(command: list[str], env: dict[str, str], line: str, signum: int) -> tuple[
    WorkerProcess, int
]:
    """Start a worker, send it signum once line appears in its output; return it and its code."""
    worker = WorkerProcess(command, env)
    try:
        worker.wait_for_line(line)
        worker.process.send_signal(signum)
        code = worker.wait(60)
    finally:
        worker.kill()
    return worker, code
