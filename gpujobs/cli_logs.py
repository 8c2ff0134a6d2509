"""`gpujobs logs JOB`: print an attempt's log from the artifact store, or follow it while it runs.

Workers upload logs/attempt-<N>.log under the job's prefix (<artifact root>/<job id>) every
few seconds while they run, and once more when they stop. --follow polls that object and
the job's state in the journal, and ends once the state is terminal and the last upload is
printed.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Optional

import typer

from gpujobs.errors import GpujobsError
from gpujobs.settings import Settings, load_settings
from gpujobs.states import JobState
from worker.protocol import LOGS_DIR, attempt_log_key
from worker.storage import ObjectNotFound, Storage, StorageError, open_storage

POLL_INTERVAL_S = 2.0
_LOG_KEY = re.compile(rf"^{LOGS_DIR}/attempt-(\d+)\.log$")

Write = Callable[[str], None]


class LogNotFound(GpujobsError):
    """The job exists but has no stored log for the attempt asked for."""


class LogUnavailable(GpujobsError):
    """The artifact store holding the log cannot be read."""


def logs(
    job_id: str = typer.Argument(..., help="Job whose log to print."),
    attempt: Optional[int] = typer.Option(
        None, "--attempt", min=1, help="Attempt number; default the latest attempt with a log."
    ),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="Keep printing new lines until the job ends."
    ),
    poll_interval_s: float = typer.Option(
        POLL_INTERVAL_S, "--poll-interval", min=0.05, help="Seconds between polls with --follow."
    ),
) -> None:
    """Print a job attempt's log from the artifact store."""
    asyncio.run(show_logs(load_settings(), job_id, attempt, follow, typer.echo, poll_interval_s))


async def show_logs(
    settings: Settings,
    job_id: str,
    attempt: int | None = None,
    follow: bool = False,
    write: Write = print,
    poll_interval_s: float = POLL_INTERVAL_S,
) -> None:
    """Write the log's lines; raises JobNotFound, LogNotFound or LogUnavailable."""
    state = await job_state(settings, job_id)
    storage = open_storage(f"{settings.artifact_root.rstrip('/')}/{job_id}")
    try:
        if follow:
            await _follow(settings, storage, job_id, attempt, write, poll_interval_s)
            return
        attempts = await log_attempts(storage)
        chosen = attempt if attempt is not None else max(attempts, default=None)
        if chosen is None or chosen not in attempts:
            raise _not_found(job_id, attempt, attempts, state)
        for line in (await _read_log(storage, chosen)).splitlines():
            write(line)
    finally:
        await storage.close()


async def job_state(settings: Settings, job_id: str) -> JobState:
    from gpujobs.jobs import list_jobs

    return JobState((await list_jobs(settings, job_id))[0].state)


async def log_attempts(storage: Storage) -> list[int]:
    """Return the attempt numbers that have a stored log, ascending."""
    try:
        keys = await storage.list(f"{LOGS_DIR}/")
    except StorageError as exc:
        raise LogUnavailable(f"cannot list logs in {storage.uri}: {exc}") from exc
    return sorted(int(match.group(1)) for key in keys if (match := _LOG_KEY.match(key)))


async def _follow(
    settings: Settings,
    storage: Storage,
    job_id: str,
    attempt: int | None,
    write: Write,
    poll_interval_s: float,
) -> None:
    printed: dict[int, int] = {}  # lines already written, per attempt
    current: int | None = None
    while True:
        # The state is read before the log, so a terminal state means the log is final.
        state = await job_state(settings, job_id)
        attempts = await log_attempts(storage)
        target = attempt if attempt is not None else max(attempts, default=None)
        if target is not None and target in attempts:
            if current is not None and target != current:
                await _write_new_lines(storage, current, printed, write)
                write(f"--- attempt {target} ---")
            current = target
            await _write_new_lines(storage, target, printed, write)
        if state.is_terminal:
            if current is None:  # it ended without a log to follow
                raise _not_found(job_id, attempt, attempts, state)
            return
        await asyncio.sleep(poll_interval_s)


async def _write_new_lines(
    storage: Storage, attempt: int, printed: dict[int, int], write: Write
) -> None:
    # NOTE: this counts lines and assumes the log only grows. A worker past its capture limit
    # drops its oldest lines, and then as many new lines are skipped here.
    lines = (await _read_log(storage, attempt)).splitlines()
    for line in lines[printed.get(attempt, 0) :]:
        write(line)
    printed[attempt] = max(len(lines), printed.get(attempt, 0))


async def _read_log(storage: Storage, attempt: int) -> str:
    key = attempt_log_key(attempt)
    try:
        return (await storage.get_bytes(key)).decode("utf-8", errors="replace")
    except ObjectNotFound:
        return ""
    except StorageError as exc:
        raise LogUnavailable(f"cannot read {storage.uri}/{key}: {exc}") from exc


def _not_found(job_id: str, attempt: int | None, attempts: list[int], state: JobState) -> LogNotFound:
    if attempt is not None and attempts:
        listed = ", ".join(str(number) for number in attempts)
        return LogNotFound(
            f"job {job_id} has no log for attempt {attempt}; attempts with a log: {listed}"
        )
    if state.is_terminal:
        return LogNotFound(
            f"job {job_id} ended ({state.value}) without a log: no worker of it uploaded one, "
            "so there is nothing to show"
        )
    return LogNotFound(
        f"job {job_id} has no log yet (state {state.value}); its worker uploads one while it "
        f"runs: retry later or run `gpujobs logs {job_id} --follow`"
    )
