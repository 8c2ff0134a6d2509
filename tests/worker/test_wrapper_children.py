"""Wrapper mode with children that do unusual things: odd step folder names, folders that
vanish, undecodable output, SIGTERM ignored, and a stop that comes before the child starts."""

from __future__ import annotations

import asyncio
import io
import logging
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.worker.processes import WorkerProcess, run_worker, signal_after, worker_env
from worker import protocol
from worker.checkpoint_store import find_latest_checkpoint
from worker.storage import LocalStorage
from worker.wire import MAX_WIRE_INT
from worker.wrapper import _stop_child, finished_steps, pack_folder
from worker.wrapper_files import WRAPPER_FILES_DIR, plain_files


def run_child(tmp_path: Path, source: str, **env: str) -> WorkerProcess:
    """Run `source` as the wrapped command with a temporary checkpoint folder; wait for it."""
    child = tmp_path / "child.py"
    child.write_text(source)
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    command = ["run", "--", sys.executable, str(child)]
    return run_worker(command, worker_env(tmp_path / "store", TMPDIR=str(scratch), **env))


def latest_step(store: Path) -> int | None:
    ref = asyncio.run(find_latest_checkpoint(LocalStorage(store)))
    return None if ref is None else ref.step


PADDED_CHILD = """
import os
from pathlib import Path

folder = Path(os.environ["GPUJOBS_CHECKPOINT_DIR"])
for step in (10, 20):
    target = folder / f"step-{step:08d}"
    target.mkdir()
    (target / "weights").write_text(str(step))
    (target / ".done").touch()
print("child done", flush=True)
"""


def test_zero_padded_step_folders_upload(tmp_path: Path) -> None:
    worker = run_child(tmp_path, PADDED_CHILD)

    assert worker.process.returncode == protocol.EXIT_OK, worker.output()
    assert latest_step(tmp_path / "store") == 20
    assert list((tmp_path / "scratch").iterdir()) == []


# Writes a step folder of many files every few milliseconds and removes the one before, so
# folders vanish while the wrapper lists, packs and walks them.
ROTATING_CHILD = """
import os, shutil, time
from pathlib import Path

folder = Path(os.environ["GPUJOBS_CHECKPOINT_DIR"])
deadline = time.monotonic() + 3
step = 0
while time.monotonic() < deadline:
    step += 1
    target = folder / f"step-{step}"
    target.mkdir()
    for i in range(50):
        (target / f"part-{i}").write_bytes(b"x" * 1000)
    (target / ".done").touch()
    shutil.rmtree(folder / f"step-{step - 1}", ignore_errors=True)
    time.sleep(0.01)
print(f"child done at step {step}", flush=True)
"""


def test_child_removing_old_steps_keeps_wrapper_alive(tmp_path: Path) -> None:
    worker = run_child(tmp_path, ROTATING_CHILD)

    assert worker.process.returncode == protocol.EXIT_OK, worker.output()
    assert "worker crashed" not in worker.output()
    last = int(worker.wait_for_line(r"child done at step (\d+)").group(1))
    assert latest_step(tmp_path / "store") == last


BINARY_OUTPUT_CHILD = """
import sys
sys.stdout.buffer.write(b"binary \\xff\\xfe output\\n")
for i in range(3000):
    sys.stdout.write(f"line {i:04d} " + "x" * 90 + "\\n")
print("child done", flush=True)
"""


def test_undecodable_output_is_replaced(tmp_path: Path) -> None:
    worker = run_child(tmp_path, BINARY_OUTPUT_CHILD)

    assert worker.process.returncode == protocol.EXIT_OK, worker.output()
    log = (tmp_path / "store" / protocol.attempt_log_key(1)).read_text()
    assert "binary \ufffd\ufffd output" in log
    assert "line 2999" in log
    assert "child done" in log


STUBBORN_CHILD = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("child ignoring SIGTERM", flush=True)
time.sleep(60)
"""


def test_child_killed_after_grace_period(tmp_path: Path) -> None:
    child = tmp_path / "child.py"
    child.write_text(STUBBORN_CHILD)
    env = worker_env(tmp_path / "store", GPUJOBS_GRACE_PERIOD_S="1")
    command = ["run", "--", sys.executable, str(child)]

    worker, code = signal_after(command, env, "child ignoring SIGTERM", signal.SIGTERM)

    assert code == protocol.EXIT_PREEMPTED, worker.output()
    assert "command still running at the end of the 1.0 s grace period" in worker.output()


def test_stop_during_restore_skips_child(tmp_path: Path) -> None:
    store = tmp_path / "store"
    stored = store / WRAPPER_FILES_DIR / "many"
    stored.mkdir(parents=True)
    for i in range(3000):  # enough files that the restore takes a while
        (stored / f"file-{i}").write_text(str(i))
    child = tmp_path / "child.py"
    child.write_text("print('child started', flush=True)\n")
    command = ["run", "--", sys.executable, str(child)]

    worker, code = signal_after(command, worker_env(store), "passed the preflight check",
                                signal.SIGTERM)

    assert code == protocol.EXIT_PREEMPTED, worker.output()
    assert "stop requested before the command started" in worker.output()
    assert "child started" not in worker.output()


def test_finished_steps_prefer_shortest_name(tmp_path: Path) -> None:
    for name in ("step-010", "step-10", "step-0000005", "step-\uff11\uff12"):  # fullwidth 12
        (tmp_path / name).mkdir()
        (tmp_path / name / ".done").touch()

    steps = finished_steps(tmp_path)

    assert list(steps) == [5, 10]
    assert steps[5].name == "step-0000005"
    assert steps[10].name == "step-10"


def test_finished_steps_skip_huge_step(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    huge = f"step-{MAX_WIRE_INT + 1}"
    for name in ("step-5", huge):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".done").touch()
    warned: set[str] = set()

    with caplog.at_level(logging.WARNING):
        first = finished_steps(tmp_path, warned)
        second = finished_steps(tmp_path, warned)

    assert list(first) == [5]
    assert list(second) == [5]
    assert warned == {huge}
    assert len([r for r in caplog.records if huge in r.getMessage()]) == 1


def test_pack_follows_symlinked_step_folder(tmp_path: Path) -> None:
    (tmp_path / ".tmp-5").mkdir()
    (tmp_path / ".tmp-5" / "weights").write_bytes(b"w5")
    (tmp_path / "step-5").symlink_to(tmp_path / ".tmp-5")

    with tarfile.open(fileobj=io.BytesIO(pack_folder(tmp_path / "step-5"))) as archive:
        names = archive.getnames()
        weights = archive.extractfile("./weights")
        assert weights is not None
        content = weights.read()

    assert "./weights" in names
    assert content == b"w5"


def test_plain_file_named_like_step_is_synced(tmp_path: Path) -> None:
    (tmp_path / "step-7").write_text("a file, not a step folder")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "step-3").write_text("nested")
    (tmp_path / "link.pt").symlink_to(tmp_path / "step-7")

    assert sorted(plain_files(tmp_path)) == ["nested/step-3", "step-7"]


def test_stop_child_kills_stubborn_group(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", STUBBORN_CHILD], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"child ignoring SIGTERM\n"
        _stop_child(child, 0.5)
        code = child.poll()
    finally:
        child.kill()
        child.wait()

    assert code == -signal.SIGKILL


UNSTORABLE_CHILD = """
import os, time
from pathlib import Path

folder = Path(os.environ["GPUJOBS_CHECKPOINT_DIR"])
(folder / "weird\\\\name.pt").write_text("no storage key can name this")
(folder / "model.pt").write_text("weights")
time.sleep(2)  # a few scans see the file
print("child done", flush=True)
"""


def test_file_without_storage_key_warns_once(tmp_path: Path) -> None:
    worker = run_child(tmp_path, UNSTORABLE_CHILD)

    assert worker.process.returncode == protocol.EXIT_OK, worker.output()
    assert len(worker.find(r"checkpoint file weird\\name.pt is never uploaded")) == 1
    assert (tmp_path / "store" / WRAPPER_FILES_DIR / "model.pt").read_text() == "weights"
    assert list((tmp_path / "scratch").iterdir()) == []
