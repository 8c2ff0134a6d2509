"""`gpujobs replay`: a job's history from its events, or a check of every projection."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone
from typing import Any

import typer
from rich.table import Table

from gpujobs.cli_console import console as make_console
from gpujobs.errors import GpujobsError, JobNotFound
from gpujobs.jobs import journal_exists, open_journal
from gpujobs.replay import check_projections, replay_job
from gpujobs.settings import Settings


def replay_command(settings: Settings, job: str | None, at: str | None, all_jobs: bool,
                   check: bool, json_output: bool) -> None:
    if all_jobs:
        if job is not None or at is not None:
            raise GpujobsError("--all replays every job to now; leave out --job and --at, or "
                               "drop --all to replay one job")
        asyncio.run(_replay_all(settings, check, json_output))
        return
    if check:
        raise GpujobsError("--check compares every stored projection; use it with --all")
    if job is None:
        raise GpujobsError("give --job ID (see `gpujobs status`), or --all --check")
    from gpujobs.audit import parse_time

    moment = parse_time(at) if at is not None else None
    result = asyncio.run(_replay_one(settings, job, moment))
    if json_output:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    _print_replay(result)


async def _replay_one(settings: Settings, job_id: str, at: float | None) -> Any:
    if not journal_exists(settings):
        raise JobNotFound(job_id, str(settings.journal_path))
    store = await open_journal(settings, read_only=True)
    try:
        return await replay_job(store, job_id, at=at, journal_path=str(settings.journal_path))
    finally:
        await store.close()


def _print_replay(result: Any) -> None:
    console = make_console()
    when = f" as of {_iso(result.as_of)}" if result.as_of is not None else ""
    checkpoint = result.last_checkpoint_step
    console.print(f"job {result.job_id}{when}: [bold]{result.state}[/bold], "
                  f"{_count(result.attempts, 'attempt')}, "
                  f"{_count(result.preemptions, 'preemption')}, cost ${result.cost_usd:.6f}, "
                  f"last checkpoint step {'none' if checkpoint is None else checkpoint}")
    table = Table("time (UTC)", "attempt", "from", "to", "event")
    for t in result.transitions:
        table.add_row(_iso(t["at"]), str(t["attempt"]), t["from"], t["to"], t["event"])
    console.print(table)


async def _replay_all(settings: Settings, check: bool, json_output: bool) -> None:
    store = await open_journal(settings, read_only=True)
    try:
        count, differences = await check_projections(store)
    finally:
        await store.close()
    if json_output:
        typer.echo(json.dumps({
            "events": count, "differences": [d.__dict__ for d in differences],
        }, indent=2, default=str))
    elif not differences:
        typer.echo(f"ok: {count} events replayed; projections match")
    else:
        for d in differences[:50]:
            typer.echo(f"{d.table} {d.key} {d.column}: stored {d.stored!r}, "
                       f"replayed {d.replayed!r}")
    if check and differences:
        raise typer.Exit(1)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _iso(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
