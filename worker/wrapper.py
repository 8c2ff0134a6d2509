"""Wrapper mode: `gpujobs-worker run -- CMD ARGS` adds checkpoint sync to any training command.

The child finds $GPUJOBS_CHECKPOINT_DIR (restored from the latest checkpoint when there is
one). It writes a checkpoint as a folder <dir>/step-<N>/ and marks it finished by creating
the empty file <dir>/step-<N>/.done last; the wrapper uploads each finished folder as a tar
archive. Plain files that the child writes into the folder are uploaded too, once stable
(worker.wrapper_files). The child runs in its own session, so a signal sent to the wrapper's
process group reaches it once: the wrapper forwards SIGTERM and SIGINT. The child's output
becomes the attempt's log.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from worker import protocol
from worker.checkpoint_store import load_latest_checkpoint
from worker.config import ENV_CHECKPOINT_DIR
from worker.errors import BadCheckpoint, CheckpointTimeout
from worker.protocol import CheckpointRef, CompletionMarker, ReportKind
from worker.session import FINAL_UPLOAD_TIMEOUT_S, WorkerSession
from worker.wire import MAX_WIRE_INT
from worker.wrapper_files import PlainFileSync

logger = logging.getLogger(__name__)

DONE_MARKER = ".done"
ARCHIVE_NAME = "payload.tar"
ENV_RESUMED_FROM_STEP = "GPUJOBS_RESUMED_FROM_STEP"
POLL_INTERVAL_S = 0.5
_STEP_FOLDER = re.compile(r"^step-([0-9]+)$")


def finished_steps(folder: Path, warned: set[str] | None = None) -> dict[int, Path]:
    """Return the checkpoint folders that have their .done file by step, ascending.

    Of two names for one step (step-10 and step-010) the shorter wins. A step above
    MAX_WIRE_INT is skipped with a warning, once per name when `warned` is given, because no
    report or manifest can carry it.
    """
    found: dict[int, Path] = {}
    names = sorted(os.listdir(folder) if folder.is_dir() else [], key=lambda n: (len(n), n))
    for name in names:
        match = _STEP_FOLDER.match(name)
        if not match or not (folder / name / DONE_MARKER).is_file():
            continue
        step = _step_number(match.group(1))
        if step is None:
            if warned is None or name not in warned:
                logger.warning(
                    "checkpoint folder %s is not uploaded: its step is above the maximum %d; "
                    "number steps from 0 upward", name[:80], MAX_WIRE_INT,
                )  # fmt: skip
                if warned is not None:
                    warned.add(name)
            continue
        found.setdefault(step, folder / name)
    return dict(sorted(found.items()))


def _step_number(digits: str) -> int | None:
    """Return the step that a folder name's digits give, None when it is above MAX_WIRE_INT."""
    digits = digits.lstrip("0") or "0"
    if len(digits) > len(str(MAX_WIRE_INT)) or int(digits) > MAX_WIRE_INT:
        return None
    return int(digits)


def pack_folder(folder: Path) -> bytes:
    """Return the folder's content as a tar archive; a folder that is a symlink is followed."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.add(folder.resolve(), arcname=".")
    return buffer.getvalue()


def unpack_archive(payload: bytes, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r") as archive:
        archive.extractall(target, filter="data")  # "data" rejects absolute paths and links out


def run_wrapped(session: WorkerSession, command: list[str]) -> int:
    """Run command under session; return the worker's exit code."""
    config = session.config
    marker = session.completion_marker()
    if marker is not None:
        return session.already_completed(marker)

    run = _Run()
    if config.checkpoint_dir:
        folder = Path(config.checkpoint_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return _run_in(session, command, folder, run)
    folder = Path(tempfile.mkdtemp(prefix="gpujobs-checkpoints-"))
    try:
        return _run_in(session, command, folder, run)
    finally:
        _remove_scratch(session, folder, run)


@dataclass
class _Run:
    """Progress of one wrapped run, read when its temporary folder is removed."""

    files: PlainFileSync | None = None
    child: subprocess.Popen | None = None
    uploaded: set[int] = field(default_factory=set)  # checkpoint steps sent or restored
    restored: set[int] = field(default_factory=set)  # checkpoint steps restored from storage
    warned: set[str] = field(default_factory=set)  # step folder names already warned about


def _run_in(session: WorkerSession, command: list[str], folder: Path, run: _Run) -> int:
    try:
        resumed = _restore_folder(session, folder)
    except BadCheckpoint as exc:
        return session.fail(str(exc), protocol.EXIT_BAD_CHECKPOINT)
    files = run.files = PlainFileSync(session.storage, session.loop, folder)
    restored_files = files.restore(timeout_s=300)
    if restored_files:
        logger.info("restored %d checkpoint files into %s", len(restored_files), folder)
    uploaded = run.uploaded
    uploaded.update(finished_steps(folder, run.warned))
    run.restored = set(uploaded)
    env = {**os.environ, ENV_CHECKPOINT_DIR: str(folder)}
    if resumed is not None:
        env[ENV_RESUMED_FROM_STEP] = str(resumed.step)

    if session.preemption.stop_requested:  # a signal or a stop came during the restore
        logger.warning("stop requested before the command started, so it is not started")
        session.started(resumed.step if resumed else 0, resumed)
        return _finish(session, files, 0, max(uploaded, default=0))
    # A session of its own: a signal to the wrapper's process group would otherwise reach
    # the child directly as well as through _forward, and the child would see it twice.
    # NOTE: the child therefore outlives a wrapper killed by SIGKILL.
    try:
        child = run.child = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            encoding="utf-8", errors="replace", start_new_session=True,
        )  # fmt: skip
    except OSError as exc:
        return session.fail(
            f"command {command[0]!r} failed to start: {exc.strerror or exc}; check its name, "
            "path and permissions in the image",
            protocol.EXIT_BAD_CONFIG,
        )
    try:
        _watch(session, child, folder, run, resumed)
    except BaseException:
        _stop_child(child, session.preemption.remaining_grace_s())
        raise
    _sync(session, folder, run)
    files.scan(final=True)  # the child has exited, so its files are closed
    return _finish(session, files, child.returncode, max(uploaded, default=0))


def _watch(
    session: WorkerSession,
    child: subprocess.Popen,
    folder: Path,
    run: _Run,
    resumed: CheckpointRef | None,
) -> None:
    """Forward stop signals and sync the folder until the child exits.

    A child still running when the grace period of a stop request ends is killed.
    """
    preemption = session.preemption
    # next() on a count is atomic and takes no lock, so the signal handler may call forward
    # too: the first caller gets 0 and forwards, any other returns.
    calls = itertools.count()

    def forward(signum: int | None) -> None:
        if next(calls) == 0:
            _forward(child, signum or signal.SIGTERM)

    preemption.on_request = forward
    if preemption.stop_requested:  # it came between the check and Popen
        forward(preemption.signal_number)
    copier = threading.Thread(target=_copy_output, args=(child, session.capture), daemon=True)
    copier.start()
    session.started(resumed.step if resumed else 0, resumed)

    files = run.files
    assert files is not None  # _run_in sets it before the child starts
    killed = False
    while child.poll() is None:
        _sync(session, folder, run)
        files.scan()
        if not killed and preemption.stop_requested and preemption.remaining_grace_s() <= 0:
            killed = True
            logger.warning(
                "command still running at the end of the %.1f s grace period; killing it",
                preemption.grace_period_s,
            )  # fmt: skip
            _signal_group(child, signal.SIGKILL)
        child_wait(child, POLL_INTERVAL_S)
    copier.join(5)


def _remove_scratch(session: WorkerSession, folder: Path, run: _Run) -> None:
    """Remove the wrapper's temporary folder, or keep it while storage lacks part of it.

    Before the command starts, the folder contains only what came from storage. Files the wrapper
    never uploads (names that start with a dot, step folders without `.done`) are removed too.
    """
    if run.child is not None and not _stored(session, run):
        logger.warning("kept %s: storage may lack some of its files", folder)
        return
    shutil.rmtree(folder, ignore_errors=True)


def _stored(session: WorkerSession, run: _Run) -> bool:
    """Return True when the command has exited and storage has every file it left."""
    if run.child is None or run.child.poll() is None or run.files is None:
        return False
    checkpoints = session.checkpoints
    try:
        durable = checkpoints.wait_durable(0)
    except CheckpointTimeout:
        return False
    newest_sent = max(run.uploaded - run.restored, default=0)
    if checkpoints.last_error is not None or (durable.step if durable else 0) < newest_sent:
        return False
    return run.files.all_stored()


def child_wait(child: subprocess.Popen, timeout_s: float) -> None:
    try:
        child.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pass


def _restore_folder(session: WorkerSession, folder: Path) -> CheckpointRef | None:
    found = session.loop.run(load_latest_checkpoint(session.storage), timeout_s=300)
    if found is None:
        return None
    ref, payload = found
    target = folder / f"step-{ref.step}"
    try:
        unpack_archive(payload, target)
    except (tarfile.TarError, OSError) as exc:
        raise BadCheckpoint(
            f"checkpoint at step {ref.step} ({ref.uri}) cannot be unpacked: {exc}"
        ) from exc
    (target / DONE_MARKER).touch()
    session.reporter.update(step=ref.step)
    logger.info("restored checkpoint at step %d into %s", ref.step, target)
    return ref


def _sync(session: WorkerSession, folder: Path, run: _Run) -> None:
    """Start the upload of each finished checkpoint folder that was not sent yet."""
    for step, path in finished_steps(folder, run.warned).items():
        if step in run.uploaded:
            continue
        try:
            payload = pack_folder(path)
        except OSError as exc:  # the child removed or rewrote it while it was read
            if path.name not in run.warned:
                run.warned.add(path.name)
                logger.warning("could not read checkpoint folder %s: %s", path.name, exc)
            continue
        run.uploaded.add(step)
        session.reporter.report(ReportKind.CHECKPOINT_STARTED, step=step, checkpointing_step=step)
        session.checkpoints.save_payload(step, payload, ARCHIVE_NAME)


def _finish(session: WorkerSession, files: PlainFileSync, returncode: int, step: int) -> int:
    """Report how the child ended; the completion marker is stored only after a clean exit."""
    config = session.config
    preemption = session.preemption
    if preemption.stop_requested:
        logger.warning("command stopped at step %d: %s", step, preemption.reason)
        session.reporter.report(ReportKind.STOPPING, step=step)
        try:
            session.checkpoints.wait_durable(max(preemption.remaining_grace_s() - 1, 0.5))
        except CheckpointTimeout:
            logger.warning("last checkpoint of the command not durable within the grace period")
        if not files.wait(max(preemption.remaining_grace_s() - 1, 0.5)):
            logger.warning("checkpoint files of the command not uploaded within the grace period")
        session.upload_attempt_files(max(preemption.remaining_grace_s(), 0.5))
        session.reporter.flush(max(preemption.remaining_grace_s(), 0.5))
        return protocol.EXIT_PREEMPTED
    if returncode != 0:
        files.wait(10)
        return session.fail(f"command exited with status {returncode}")

    session.checkpoints.wait_durable(FINAL_UPLOAD_TIMEOUT_S)
    if not files.wait(FINAL_UPLOAD_TIMEOUT_S):
        logger.warning("checkpoint files not uploaded within %.0f s", FINAL_UPLOAD_TIMEOUT_S)
    logger.info(
        "job %s attempt %d: command finished at step %d", config.job_id, config.attempt, step
    )
    session.upload_attempt_files(FINAL_UPLOAD_TIMEOUT_S)
    marker = CompletionMarker(config.job_id, config.attempt, step, time.time(), {})
    session.loop.run(
        session.storage.put_bytes(protocol.COMPLETION_MARKER, marker.to_json().encode()),
        FINAL_UPLOAD_TIMEOUT_S,
    )
    session.reporter.report(ReportKind.COMPLETED, step=step)
    session.reporter.flush(10)
    return protocol.EXIT_OK


def _forward(child: subprocess.Popen, signum: int) -> None:
    if child.poll() is None:
        child.send_signal(signum)


def _signal_group(child: subprocess.Popen, signum: int) -> None:
    """Send signum to the child's process group: the child and what it started."""
    try:
        os.killpg(child.pid, signum)
    except (ProcessLookupError, PermissionError):  # the group has exited
        pass


def _stop_child(child: subprocess.Popen, grace_period_s: float) -> None:
    """Stop a child that the wrapper can no longer watch: SIGTERM, then SIGKILL after grace."""
    if child.poll() is not None:
        return
    logger.warning("stopping the command (pid %d): the wrapper failed", child.pid)
    _signal_group(child, signal.SIGTERM)
    try:
        child.wait(grace_period_s)
    except subprocess.TimeoutExpired:
        _signal_group(child, signal.SIGKILL)
        child_wait(child, 5)


def _copy_output(child: subprocess.Popen, capture) -> None:
    """Copy the child's output to the wrapper's stdout and the attempt log until it closes."""
    assert child.stdout is not None
    for line in child.stdout:
        try:
            sys.stdout.write(line)
            sys.stdout.flush()
        except (OSError, ValueError):  # keep draining the pipe, or the child blocks on write
            pass
        if capture is not None:
            capture.add_line(line.rstrip("\n"))
