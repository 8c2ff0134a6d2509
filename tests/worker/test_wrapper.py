"""Wrapper mode: `gpujobs-worker run -- CMD` syncs a child's checkpoint folders and signals."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from tests.worker.processes import WorkerProcess, run_worker, signal_after, worker_env
from worker import protocol
from worker.checkpoint_store import find_latest_checkpoint
from worker.storage import LocalStorage
from worker.wrapper import finished_steps, pack_folder, unpack_archive
from worker.wrapper_files import WRAPPER_FILES_DIR, plain_files

CHILD = """
import os, signal, sys, time
from pathlib import Path

folder = Path(os.environ["GPUJOBS_CHECKPOINT_DIR"])
done = sorted(int(p.name[5:]) for p in folder.glob("step-*") if (p / ".done").exists())
step = int((folder / f"step-{done[-1]}" / "count").read_text()) if done else 0
print(f"child starting at step {step}", flush=True)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))

def save(step):
    target = folder / f"step-{step}"
    target.mkdir(exist_ok=True)
    (target / "count").write_text(str(step))
    (target / ".done").touch()

while step < 30:
    time.sleep(0.05)
    step += 1
    if step % 5 == 0:
        save(step)
    if stop:
        save(step)
        print(f"child stopped at step {step}", flush=True)
        sys.exit(0)
print("child done", flush=True)
"""


def test_wrapper_syncs_and_resumes(tmp_path: Path) -> None:
    store = tmp_path / "store"
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    command = ["run", "--", sys.executable, str(child)]

    worker = WorkerProcess(command, worker_env(store, GPUJOBS_CHECKPOINT_DIR=str(tmp_path / "a")))
    try:
        worker.wait_for_line(r"checkpoint at step 5 durable")
        worker.process.send_signal(signal.SIGTERM)
        first_code = worker.wait(60)
    finally:
        worker.kill()
    stopped = int(worker.wait_for_line(r"child stopped at step (\d+)").group(1))
    ref = asyncio.run(find_latest_checkpoint(LocalStorage(store)))

    assert first_code == protocol.EXIT_PREEMPTED, worker.output()
    assert ref is not None
    assert ref.step == stopped
    assert ref.uri.endswith("payload.tar")

    env = worker_env(store, attempt=2, GPUJOBS_CHECKPOINT_DIR=str(tmp_path / "b"))
    resumed = run_worker(command, env)

    assert resumed.process.returncode == protocol.EXIT_OK, resumed.output()
    assert f"child starting at step {stopped}" in resumed.output()
    assert (store / protocol.COMPLETION_MARKER).exists()
    log = (store / protocol.attempt_log_key(2)).read_text()
    assert "child done" in log
    latest = asyncio.run(find_latest_checkpoint(LocalStorage(store)))
    assert latest.step == 30


def test_wrapper_reports_child_failure(tmp_path: Path) -> None:
    store = tmp_path / "store"
    command = ["run", "--", sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]

    worker = run_worker(command, worker_env(store))

    assert worker.process.returncode == protocol.EXIT_FAILED, worker.output()
    assert "command exited with status 3" in worker.output()
    assert not (store / protocol.COMPLETION_MARKER).exists()
    assert "boom" in (store / protocol.attempt_log_key(1)).read_text()


def test_wrapper_requires_command(tmp_path: Path) -> None:
    worker = run_worker(["run", "--"], worker_env(tmp_path / "store"))

    assert worker.process.returncode == protocol.EXIT_BAD_CONFIG
    assert "missing command" in worker.output()


def test_wrapper_reports_missing_command(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = worker_env(tmp_path / "store", TMPDIR=str(scratch))

    worker = run_worker(["run", "--", str(tmp_path / "no-such-trainer")], env)

    assert worker.process.returncode == protocol.EXIT_BAD_CONFIG, worker.output()
    assert f"command '{tmp_path / 'no-such-trainer'}' failed to start" in worker.output()
    assert "No such file or directory" in worker.output()
    assert list(scratch.iterdir()) == []


def test_finished_steps_need_done_file(tmp_path: Path) -> None:
    for name in ("step-5", "step-10", "step-7", "other"):
        (tmp_path / name).mkdir()
    for name in ("step-5", "step-10", "other"):
        (tmp_path / name / ".done").touch()

    assert list(finished_steps(tmp_path)) == [5, 10]


def test_pack_unpack_roundtrip(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "weights.bin").write_bytes(b"\x00\x01")

    unpack_archive(pack_folder(source), tmp_path / "dst")

    assert (tmp_path / "dst" / "sub" / "weights.bin").read_bytes() == b"\x00\x01"


# Unmodified training code: one plain file rewritten in place, no step folders, no .done.
PLAIN_CHILD = """
import os, signal, time
from pathlib import Path

folder = Path(os.environ["GPUJOBS_CHECKPOINT_DIR"])
state = folder / "state.txt"
step = int(state.read_text()) if state.exists() else 0
received = []
for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, lambda number, frame: received.append(signal.Signals(number).name))
print(f"child starting at step {step}", flush=True)  # after the handlers, for the tests
while step < 80 and not received:
    time.sleep(0.05)
    step += 1
    if step % 20 == 0:
        state.write_text(str(step))
        (folder / "logs").mkdir(exist_ok=True)
        (folder / "logs" / "seen.txt").write_text(f"seen {step}")
if received:
    time.sleep(1.0)  # a second delivery of the signal would arrive by now
    state.write_text(str(step))
    print(f"child stopped at step {step} after {','.join(received)}", flush=True)
else:
    print("child done", flush=True)
"""
STOPPED = r"child stopped at step (\d+) after (\S+)$"
STARTED = r"child starting at step 0"
UPLOADED = r"checkpoint file state.txt uploaded"


def plain_child_command(tmp_path: Path) -> list[str]:
    child = tmp_path / "plain_child.py"
    child.write_text(PLAIN_CHILD)
    return ["run", "--", sys.executable, str(child)]


def test_wrapper_syncs_plain_files(tmp_path: Path) -> None:
    store = tmp_path / "store"
    command = plain_child_command(tmp_path)
    env = worker_env(store, GPUJOBS_CHECKPOINT_DIR=str(tmp_path / "a"))

    worker, first_code = signal_after(command, env, UPLOADED, signal.SIGTERM)
    stopped = int(worker.wait_for_line(STOPPED).group(1))

    assert first_code == protocol.EXIT_PREEMPTED, worker.output()
    assert (store / WRAPPER_FILES_DIR / "state.txt").read_text() == str(stopped)
    assert (store / WRAPPER_FILES_DIR / "logs" / "seen.txt").read_text().startswith("seen ")

    env = worker_env(store, attempt=2, GPUJOBS_CHECKPOINT_DIR=str(tmp_path / "b"))
    resumed = run_worker(command, env)

    assert resumed.process.returncode == protocol.EXIT_OK, resumed.output()
    assert f"child starting at step {stopped}" in resumed.output()
    assert "restored 2 checkpoint files" in resumed.output()
    assert (store / WRAPPER_FILES_DIR / "state.txt").read_text() == "80"


def test_wrapper_removes_temporary_folder(tmp_path: Path) -> None:
    store = tmp_path / "store"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    command = plain_child_command(tmp_path)
    env = worker_env(store, TMPDIR=str(scratch))

    worker, first_code = signal_after(command, env, UPLOADED, signal.SIGTERM)

    assert first_code == protocol.EXIT_PREEMPTED, worker.output()
    assert list(scratch.iterdir()) == [], worker.output()
    stopped = int(worker.wait_for_line(STOPPED).group(1))

    resumed = run_worker(command, worker_env(store, 2, TMPDIR=str(scratch)))

    assert resumed.process.returncode == protocol.EXIT_OK, resumed.output()
    assert f"child starting at step {stopped}" in resumed.output()
    assert f"checkpoint files into {scratch}/gpujobs-checkpoints-" in resumed.output()
    assert list(scratch.iterdir()) == [], resumed.output()


def test_wrapper_keeps_folder_after_failed_upload(tmp_path: Path) -> None:
    store = tmp_path / "store"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    # The child saves steps 5 to 30; a file where step 30's folder goes fails its upload.
    (store / protocol.CHECKPOINTS_DIR).mkdir(parents=True)
    (store / protocol.checkpoint_prefix(30)).write_text("in the way")
    command = ["run", "--", sys.executable, str(child)]

    worker = run_worker(command, worker_env(store, TMPDIR=str(scratch)))

    folders = list(scratch.iterdir())
    assert len(folders) == 1, worker.output()
    assert f"kept {folders[0]}" in worker.output()
    assert (folders[0] / "step-30" / "count").read_text() == "30"


def test_wrapper_forwards_sigint(tmp_path: Path) -> None:
    store = tmp_path / "store"
    command = plain_child_command(tmp_path)
    worker, code = signal_after(command, worker_env(store), STARTED, signal.SIGINT)

    assert code == protocol.EXIT_PREEMPTED, worker.output()
    assert worker.wait_for_line(STOPPED).group(2) == "SIGINT"


def test_group_signal_reaches_child_once(tmp_path: Path) -> None:
    store = tmp_path / "store"
    worker = WorkerProcess(plain_child_command(tmp_path), worker_env(store), new_session=True)
    try:
        worker.wait_for_line(r"child starting at step 0")
        os.killpg(worker.process.pid, signal.SIGTERM)  # the worker leads its own group
        code = worker.wait(60)
    finally:
        worker.kill()

    assert code == protocol.EXIT_PREEMPTED, worker.output()
    assert worker.wait_for_line(STOPPED).group(2) == "SIGTERM"


def test_plain_files_skip_step_folders(tmp_path: Path) -> None:
    (tmp_path / "step-5").mkdir()
    (tmp_path / "step-5" / "weights.bin").write_bytes(b"w")
    (tmp_path / ".partial").write_bytes(b"p")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "model.pt").write_bytes(b"abc")
    (tmp_path / "state.txt").write_text("7")

    assert sorted(plain_files(tmp_path)) == ["nested/model.pt", "state.txt"]
    assert plain_files(tmp_path)["nested/model.pt"][0] == 3
