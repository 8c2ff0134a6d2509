"""`gpujobs audit`: list and export journal events, verify the hash chain, query read-only."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from gpujobs.cli_console import console
from gpujobs.errors import GpujobsError
from gpujobs.settings import load_settings

audit_app = typer.Typer(
    invoke_without_command=True,
    help="List, export and verify the event journal, or query it with read-only SQL.",
)
FORMATS = ("table", "csv", "jsonl")
TABLE_DEFAULT_LIMIT = 100
MAX_QUERY_TIMEOUT_S = 86_400.0
MAX_QUERY_ROWS = 10_000_000


def _journal_path() -> Path:
    """Return the journal's path; raise a one-line error when it is missing or unreadable."""
    from gpujobs.jobs import journal_exists

    settings = load_settings()
    if not journal_exists(settings):
        raise GpujobsError(f"no journal at {settings.journal_path}; submit a job first or "
                           "check GPUJOBS_HOME")
    return settings.journal_path


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


@audit_app.callback()
def audit_events(
    ctx: typer.Context,
    job: Optional[str] = typer.Option(None, "--job", help="Only events of this job id."),
    event_types: Optional[list[str]] = typer.Option(
        None, "--type", help="Only events of this type, such as CostAccrued; repeatable."
    ),
    since: Optional[str] = typer.Option(
        None, help="Only events recorded at or after this time (ISO 8601, UTC by default, or "
        "unix seconds)."
    ),
    until: Optional[str] = typer.Option(
        None, help="Only events recorded at or before this time (ISO 8601 or unix seconds)."
    ),
    team: Optional[str] = typer.Option(None, help="Only events of jobs billed to this team."),
    project: Optional[str] = typer.Option(None, help="Only events of jobs in this project."),
    limit: Optional[int] = typer.Option(
        None, help="Show the newest N matching events (default: 100 in a table, all otherwise)."
    ),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON array."),
    output_format: str = typer.Option(
        "table", "--format", help="table, csv or jsonl (one JSON object per line)."
    ),
) -> None:
    """List journal events, oldest first, filtered by job, type, time, team and project."""
    if ctx.invoked_subcommand is not None:
        return
    from gpujobs.audit import AuditFilters, parse_time, query_events, write_csv, write_jsonl

    if output_format not in FORMATS:
        raise GpujobsError(f"invalid --format {output_format!r}; use one of: {', '.join(FORMATS)}")
    if json_output and output_format != "table":
        raise GpujobsError(f"--json and --format {output_format} conflict; give only one")
    table_view = output_format == "table" and not json_output
    default_limit = limit is None and table_view
    if default_limit:
        limit = TABLE_DEFAULT_LIMIT
    filters = AuditFilters(
        job=job, types=tuple(event_types or ()),
        since=parse_time(since) if since is not None else None,
        until=parse_time(until) if until is not None else None,
        team=team, project=project, limit=limit,
    )
    rows = query_events(_journal_path(), filters)
    if json_output:
        _print_json(rows)
    elif output_format == "csv":
        write_csv(rows, sys.stdout)
    elif output_format == "jsonl":
        write_jsonl(rows, sys.stdout)
    else:
        _print_table(rows, limit if default_limit else None)


def _print_table(rows: list[dict[str, Any]], default_limit: int | None) -> None:
    from gpujobs.audit import summarize_data

    table = Table("seq", "time (UTC)", "job", "attempt", "event", "team/project", "data")
    for row in rows:
        team_project = f"{row['team']}/{row['project']}" if row["team"] is not None else "-"
        attempt = "-" if row["attempt"] is None else str(row["attempt"])
        table.add_row(str(row["seq"]), row["recorded_utc"], row["job_id"], attempt, row["type"],
                      team_project, summarize_data(row["data"]))
    console().print(table)
    if default_limit is not None and len(rows) == default_limit:
        typer.echo(f"showing the newest {default_limit} matching events; use --limit or "
                   "--format csv for more", err=True)


@audit_app.command("verify")
def audit_verify(
    head: Optional[str] = typer.Option(
        None, help="SEQ:HASH printed earlier by `gpujobs audit head`; the row with that seq "
        "must still have that hash, so deleted or rewritten newest rows are caught too."
    ),
) -> None:
    """Recompute the journal's hash chain; name the first row that does not match."""
    from journal import verify_file

    path = _journal_path()
    result = verify_file(path, _parse_head(head) if head else None)
    if result.ok:
        anchored = f", head seq {head.split(':')[0]} matches" if head else ""
        typer.echo(f"ok: {result.event_count} events, chain verified{anchored}")
        return
    typer.echo(f"journal {path} fails verification at seq "
               f"{result.first_bad_seq}: {result.reason}", err=True)
    # NOTE: not typer.Exit(1): gpujobs.cli.main runs the app with standalone_mode=False, and
    # click then returns typer.Exit's code instead of exiting with it.
    sys.exit(1)


_MAX_SEQ = 2**63 - 1  # SQLite's largest INTEGER


def _parse_head(text: str) -> tuple[int, str]:
    seq_text, _, hash_text = text.partition(":")
    valid_hash = len(hash_text) == 64 and all(c in "0123456789abcdef" for c in hash_text)
    valid_seq = (seq_text.isascii() and seq_text.isdigit() and len(seq_text) <= 19
                 and 1 <= int(seq_text) <= _MAX_SEQ)
    if not valid_seq or not valid_hash:
        raise GpujobsError(
            f"invalid --head {text!r}; use SEQ:HASH as printed by `gpujobs audit head`"
        )
    return int(seq_text), hash_text


@audit_app.command("head")
def audit_head(
    json_output: bool = typer.Option(False, "--json", help="Print a JSON object."),
) -> None:
    """Print the newest event's seq and hash as SEQ:HASH; keep it outside the journal.

    A later `gpujobs audit verify --head SEQ:HASH` then detects deleted or rewritten rows up to
    that point, which the hash chain alone cannot.
    """
    from journal import read_head

    head = read_head(_journal_path())
    if head is None:
        raise GpujobsError("the journal has no events yet, so it has no head to record")
    if json_output:
        _print_json({"seq": head[0], "hash": head[1]})
        return
    typer.echo(f"{head[0]}:{head[1]}")


@audit_app.command("sql")
def audit_sql(
    query: str = typer.Argument(..., help="One read-only SQL statement."),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON array of objects."),
    timeout_s: float = typer.Option(
        30.0, "--timeout-s", help="Seconds the query may run before it is stopped."),
    max_rows: int = typer.Option(
        10_000, "--max-rows", help="Maximum number of rows to print; a query returning more is rejected."),
) -> None:
    """Run a read-only SQL query against the journal, its tables and views."""
    from journal import QueryLimits, run_readonly_query

    if not 0 < timeout_s <= MAX_QUERY_TIMEOUT_S:  # also False for nan
        raise GpujobsError(f"invalid --timeout-s {timeout_s}; use a number of seconds above 0 "
                           f"and at most {MAX_QUERY_TIMEOUT_S:g}")
    if not 1 <= max_rows <= MAX_QUERY_ROWS:
        raise GpujobsError(f"invalid --max-rows {max_rows}; use 1 to {MAX_QUERY_ROWS}")
    limits = QueryLimits(timeout_s=timeout_s, max_rows=max_rows)
    columns, rows = run_readonly_query(_journal_path(), query, limits=limits)
    if json_output:
        _print_json([dict(zip(columns, row)) for row in rows])
        return
    table = Table(*columns)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console().print(table)
