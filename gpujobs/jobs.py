"""Requests users make of jobs (submit, cancel) and the queries behind `status`.

These write to the journal from any process; only the supervisor acts on them.
"""

from __future__ import annotations

import asyncio
import getpass
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from journal import EventStore, VersionConflict, connect_readonly

from gpujobs import events as ev
from gpujobs.errors import GpujobsError, JobNotFound
from gpujobs.jobspec import JobSpec
from gpujobs.profiles import Profile, get_profile, load_profiles
from gpujobs.projections import JOB_COLUMNS, JobsProjection, decode_row
from gpujobs.settings import Settings
from gpujobs.states import JobState
from gpujobs.supervisor.queue import read_queue


async def open_journal(settings: Settings, *, read_only: bool = False) -> EventStore:
    """Open the journal in GPUJOBS_HOME; only a writer creates the folder and the file.

    A read-only open never changes the file, so it works on a journal in a read-only folder.
    """
    if not read_only:
        make_home(settings.home)
    elif not journal_exists(settings):
        raise GpujobsError(f"no journal at {settings.journal_path}; submit a job first or check "
                           "GPUJOBS_HOME")
    return await EventStore.open(settings.journal_path, projections=[JobsProjection()],
                                 read_only=read_only)


def journal_exists(settings: Settings) -> bool:
    """Return whether the journal file exists; raise a one-line error when it cannot be read."""
    try:
        _reject_file_home(settings.home)
        return settings.journal_path.is_file()
    except OSError as exc:
        raise GpujobsError(f"cannot read GPUJOBS_HOME={settings.home} ({exc.strerror or exc}); "
                           "fix its permissions or point GPUJOBS_HOME to another folder") from exc


def make_home(home: Path) -> None:
    """Create the GPUJOBS_HOME folder, or raise a one-line error naming it and the fix."""
    try:
        _reject_file_home(home)
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GpujobsError(f"cannot create GPUJOBS_HOME={home} ({exc.strerror or exc}); "
                           "point GPUJOBS_HOME to a writable folder") from exc


def _reject_file_home(home: Path) -> None:
    if home.exists() and not home.is_dir():
        raise GpujobsError(f"GPUJOBS_HOME={home} is a file, not a folder; point GPUJOBS_HOME "
                           "to a folder")


def profiles_in_effect(settings: Settings) -> dict[str, Profile]:
    files = settings.profile_files()
    if not files:
        raise GpujobsError(
            "no gpu_profiles.yaml found in "
            + ", ".join(str(d) for d in settings.config_dirs)
            + "; set GPUJOBS_CONFIG_DIR to a folder that has one"
        )
    return load_profiles(files, env=settings.env)


def new_job_id(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


async def submit(settings: Settings, spec: JobSpec, *, store: EventStore | None = None) -> str:
    """Append JobSubmitted for a validated spec; returns the new job id."""
    profile = get_profile(profiles_in_effect(settings), spec.profile)
    job_id = new_job_id(spec.name)
    event = ev.JobSubmitted(
        job_id=job_id, name=spec.name, team=spec.team, project=spec.project,
        profile_name=profile.name, profile=profile.to_dict(), spec=spec.to_dict(),
        priority=spec.priority, submitted_by=_user(),
    )
    own = store is None
    store = store or await open_journal(settings)
    try:
        await store.append(job_id, [event.to_new_event()], expected_version=0)
    finally:
        if own:
            await store.close()
    return job_id


async def cancel(settings: Settings, job_id: str) -> JobState:
    """Record a cancel request; the supervisor destroys the instances and ends the job."""
    store = await open_journal(settings)
    try:
        for _ in range(10):
            job = await load_job(store, job_id, settings.journal_path)
            state = JobState(job["state"])
            if state.is_terminal:
                return state
            try:
                await store.append(job_id, [ev.CancelRequested(_user()).to_new_event()],
                                   expected_version=int(job["version"]))
                return state
            except VersionConflict:
                continue  # the supervisor appended meanwhile; read again and retry
        raise GpujobsError(f"job {job_id} kept changing; try `gpujobs cancel {job_id}` again")
    finally:
        await store.close()


async def load_job(store: EventStore, job_id: str, journal_path: Path) -> dict[str, Any]:
    rows = await store.query(f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs WHERE job_id = ?",
                             (job_id,))
    if not rows:
        raise JobNotFound(job_id, str(journal_path))
    return decode_row(JOB_COLUMNS, tuple(rows[0]))


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    name: str
    state: str
    attempt: int
    profile: str
    team: str
    project: str
    step: int
    total_steps: int
    last_checkpoint_step: int | None
    preemptions: int
    cost_usd: float
    reason: str | None
    instance_id: int | None
    queue_position: int | None = None  # among waiting jobs, as the supervisor last ordered them
    wait_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


async def list_jobs(settings: Settings, job_id: str | None = None) -> list[JobStatus]:
    """Read the jobs from the journal without writing to it; no journal yet lists no jobs."""
    if not journal_exists(settings):
        if job_id is not None:
            raise JobNotFound(job_id, str(settings.journal_path))
        return []
    store = await open_journal(settings, read_only=True)
    try:
        if job_id is not None:
            rows = [await load_job(store, job_id, settings.journal_path)]
        else:
            raw = await store.query(
                f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs ORDER BY submitted_at"
            )
            rows = [decode_row(JOB_COLUMNS, tuple(r)) for r in raw]
    finally:
        await store.close()
    waiting = await asyncio.to_thread(_read_queue, settings.journal_path)
    return [_status(row, waiting.get(row["job_id"])) for row in rows]


def _read_queue(path: Path) -> dict[str, tuple[int, str | None]]:
    conn = connect_readonly(path)
    try:
        return read_queue(conn)
    except sqlite3.OperationalError:
        return {}  # no supervisor has ordered the queue yet, so its table does not exist
    finally:
        conn.close()


def _status(row: dict[str, Any], waiting: tuple[int, str | None] | None) -> JobStatus:
    queued = row["state"] == JobState.QUEUED.value and waiting is not None
    return JobStatus(
        job_id=row["job_id"], name=row["name"], state=row["state"], attempt=int(row["attempt"]),
        profile=row["profile_name"], team=row["team"], project=row["project"],
        step=int(row["step"] or 0), total_steps=int(row["spec"].get("total_steps", 0)),
        last_checkpoint_step=row["last_checkpoint_step"], preemptions=int(row["preemptions"]),
        cost_usd=float(row["cost_usd"]), reason=row["reason"], instance_id=row["instance_id"],
        queue_position=waiting[0] if queued and waiting else None,
        wait_reason=waiting[1] if queued and waiting else None,
    )


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
