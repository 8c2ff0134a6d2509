"""`gpujobs logs`: attempt choice, clear errors, and --follow on a real worker's periodic uploads."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from gpujobs import events as ev
from gpujobs.cli_logs import LogNotFound, logs, show_logs
from gpujobs.errors import JobNotFound
from gpujobs.jobs import load_job, open_journal, submit
from gpujobs.jobspec import JobSpec
from gpujobs.settings import load_settings
from tests.worker.processes import WorkerProcess, worker_env
from worker import protocol


@pytest.fixture
def settings(tmp_path: Path):
    return load_settings().replace(artifact_uri=(tmp_path / "artifacts").as_uri())


async def new_job(settings) -> str:
    return await submit(settings, JobSpec(name="logs", profile="dev-test"))


def job_folder(settings, job_id: str) -> Path:
    return Path(settings.artifact_root.removeprefix("file://")) / job_id


def write_log(settings, job_id: str, attempt: int, text: str) -> None:
    path = job_folder(settings, job_id) / protocol.attempt_log_key(attempt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


async def end_job(settings, job_id: str) -> None:
    store = await open_journal(settings)
    try:
        job = await load_job(store, job_id, settings.journal_path)
        event = ev.JobCancelled(reason="test over").to_new_event()
        await store.append(job_id, [event], expected_version=int(job["version"]))
    finally:
        await store.close()


async def collect(settings, job_id: str, **options) -> list[str]:
    lines: list[str] = []
    await show_logs(settings, job_id, write=lines.append, **options)
    return lines


async def test_latest_attempt_by_default(settings) -> None:
    job_id = await new_job(settings)
    write_log(settings, job_id, 1, "first attempt\n")
    write_log(settings, job_id, 2, "second attempt\nline two\n")

    assert await collect(settings, job_id) == ["second attempt", "line two"]
    assert await collect(settings, job_id, attempt=1) == ["first attempt"]


async def test_unknown_job_names_fix(settings) -> None:
    with pytest.raises(JobNotFound) as caught:
        await collect(settings, "job-missing")

    assert "gpujobs status" in str(caught.value)


async def test_no_log_yet_names_fix(settings) -> None:
    job_id = await new_job(settings)

    with pytest.raises(LogNotFound) as caught:
        await collect(settings, job_id)

    message = str(caught.value)
    assert "no log yet" in message
    assert "--follow" in message
    assert "\n" not in message


async def test_ended_job_without_log(settings) -> None:
    job_id = await new_job(settings)
    await end_job(settings, job_id)

    for follow in (False, True):
        with pytest.raises(LogNotFound) as caught:
            await collect(settings, job_id, follow=follow)

        assert str(caught.value) == (f"job {job_id} ended (cancelled) without a log: no worker "
                                     "of it uploaded one, so there is nothing to show")


async def test_missing_attempt_lists_others(settings) -> None:
    job_id = await new_job(settings)
    write_log(settings, job_id, 1, "only one\n")

    with pytest.raises(LogNotFound, match="no log for attempt 3; attempts with a log: 1"):
        await collect(settings, job_id, attempt=3)


async def test_follow_switches_attempts(settings) -> None:
    job_id = await new_job(settings)
    write_log(settings, job_id, 1, "a1\n")
    lines: list[str] = []
    task = asyncio.create_task(
        show_logs(settings, job_id, follow=True, write=lines.append, poll_interval_s=0.05)
    )
    await wait_for(lambda: "a1" in lines)
    write_log(settings, job_id, 1, "a1\na1 last\n")
    write_log(settings, job_id, 2, "a2\n")
    await wait_for(lambda: "a2" in lines)
    await end_job(settings, job_id)
    await asyncio.wait_for(task, 10)

    assert lines == ["a1", "a1 last", "--- attempt 2 ---", "a2"]


async def wait_for(condition, timeout_s: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_follow_real_worker_until_terminal(settings) -> None:
    job_id = await new_job(settings)
    store = job_folder(settings, job_id)
    env = worker_env(store, GPUJOBS_TOTAL_STEPS="150", GPUJOBS_STEP_DELAY_S="0.02",
                     GPUJOBS_LOG_UPLOAD_INTERVAL_S="0.3")  # fmt: skip
    worker = WorkerProcess(["train-digits"], env)
    lines: list[str] = []
    task = asyncio.create_task(
        show_logs(settings, job_id, follow=True, write=lines.append, poll_interval_s=0.1)
    )
    try:
        await wait_for(lambda: any("started at step 0" in line for line in lines), 90)
        running_while_shown = worker.process.poll() is None
        code = await asyncio.to_thread(worker.wait, 90)
    finally:
        worker.kill()
    await end_job(settings, job_id)
    await asyncio.wait_for(task, 10)

    assert running_while_shown
    assert code == protocol.EXIT_OK, worker.output()
    assert any("completed at step 150" in line for line in lines)
    assert len([line for line in lines if "started at step" in line]) == 1


def test_command_prints_log(settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUJOBS_ARTIFACT_URI", settings.artifact_root)
    job_id = asyncio.run(new_job(settings))
    write_log(settings, job_id, 1, "hello from the worker\n")
    app = typer.Typer()
    app.command()(logs)

    result = CliRunner().invoke(app, [job_id, "--attempt", "1"])

    assert result.exit_code == 0, result.output
    assert result.output == "hello from the worker\n"
