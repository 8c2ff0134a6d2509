"""`gpujobs audit`: verify the journal's hash chain and query it read-only."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from gpujobs.settings import load_settings

audit_app = typer.Typer(no_args_is_help=True, help="Query and verify the event journal.")
out = Console()


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


@audit_app.command("verify")
def audit_verify() -> None:
    """Recompute the journal's hash chain; name the first row that does not match."""
    from journal import verify_file

    settings = load_settings()
    result = verify_file(settings.journal_path)
    if result.ok:
        typer.echo(f"ok: {result.event_count} events, chain verified")
        return
    typer.echo(f"journal {settings.journal_path} fails verification at seq "
               f"{result.first_bad_seq}: {result.reason}", err=True)
    raise typer.Exit(1)


@audit_app.command("sql")
def audit_sql(
    query: str = typer.Argument(..., help="A read-only SQL query."),
    json_output: bool = typer.Option(False, "--json"),
) -> None:
    """Run a read-only SQL query against the journal and its views."""
    from journal import run_readonly_query

    columns, rows = run_readonly_query(load_settings().journal_path, query)
    if json_output:
        _print_json([dict(zip(columns, row)) for row in rows])
        return
    table = Table(*columns)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    out.print(table)
