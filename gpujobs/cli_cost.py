"""`gpujobs cost-report`: spend from the journal by team, project, job, GPU or day."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from gpujobs.cli_console import console
from gpujobs.cost_report import (
    FORMATS, GROUPINGS, ReconcileRow, ReportRow, check_plot_grouping, format_rows,
    load_job_costs, parse_time, plot_report, reconcile, report_rows, total_row,
)
from gpujobs.errors import GpujobsError
from gpujobs.settings import Settings, load_settings


async def build_report(settings: Settings, by: str, since: float | None, until: float | None,
                       *, with_reconcile: bool = False,
                       plot: Path | None = None) -> tuple[list[ReportRow], list[ReconcileRow]]:
    """Read the journal once; returns the rows and, if asked, the reconcile rows."""
    from gpujobs.jobs import open_journal

    store = await open_journal(settings, read_only=True)
    try:
        costs = await load_job_costs(store)
    finally:
        await store.close()
    rows = report_rows(costs, by, since, until)
    checked: list[ReconcileRow] = []
    if with_reconcile:
        from gpujobs.vast.client import VastClient

        async with VastClient(api_key=settings.vast_api_key, base_url=settings.vast_url) as vast:
            checked = await reconcile(costs, vast, since, until)
    if plot is not None:
        plot_report(costs, plot, by, since, until)
    return rows, checked


def cost_report(
    by: str = typer.Option("team", "--by", help=f"Group by: {', '.join(GROUPINGS)}."),
    since: Optional[str] = typer.Option(None, "--since", help="Start (ISO 8601 or unix s)."),
    until: Optional[str] = typer.Option(None, "--until", help="End (ISO 8601 or unix s)."),
    fmt: str = typer.Option("table", "--format", help=f"Output: {', '.join(FORMATS)}."),
    check: bool = typer.Option(False, "--reconcile",
                               help="Compare the journal's cost per instance with the charges."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of spend over time."),
) -> None:
    """Show spend from the journal, split into useful work and waste."""
    if by not in GROUPINGS:
        raise GpujobsError(f"invalid --by {by!r}; use one of {', '.join(GROUPINGS)}")
    if fmt not in FORMATS:
        raise GpujobsError(f"invalid --format {fmt!r}; use one of {', '.join(FORMATS)}")
    if plot is not None:
        check_plot_grouping(by)
    start = parse_time(since) if since else None
    end = parse_time(until) if until else None
    rows, checked = asyncio.run(build_report(load_settings(), by, start, end,
                                             with_reconcile=check, plot=plot))
    if fmt == "table":
        print_table(rows, by)
    elif not check:
        typer.echo(format_rows(rows, by, fmt).rstrip("\n"))
    if check:
        _print_reconcile(rows, by, checked, fmt)
    if plot is not None:
        typer.echo(f"plot written to {plot}", err=True)
    if check and not all(row.matches or row.live or not row.settled for row in checked):
        raise typer.Exit(1)


def print_table(rows: list[ReportRow], by: str) -> None:
    table = Table(by, "jobs", "attempts", "cost $", "useful $", "provisioning $", "lost $",
                  "idle $", "waste %")
    for row in [*rows, total_row(rows)]:
        table.add_row(row.group, str(row.jobs), str(row.attempts), f"{row.cost_usd:.4f}",
                      f"{row.useful_usd:.4f}", f"{row.provisioning_usd:.4f}",
                      f"{row.lost_usd:.4f}", f"{row.idle_usd:.4f}", f"{row.waste_pct:.1f}")
    console().print(table)


def _print_reconcile(rows: list[ReportRow], by: str, checked: list[ReconcileRow],
                     fmt: str) -> None:
    if fmt == "json":
        import json

        report: dict[str, Any] = json.loads(format_rows(rows, by, "json"))
        report["reconcile"] = [row.to_dict() for row in checked]
        typer.echo(json.dumps(report, indent=2))
        return
    if fmt == "csv":
        typer.echo(format_rows(rows, by, "csv").rstrip("\n"))
    table = Table("instance", "job", "attempt", "journal $", "charged $", "diff $", "status",
                  title="journal vs charges")
    for row in checked:
        status = "ok"
        if not row.matches:
            status = "live: journal lags" if row.live else "MISMATCH"
            if not row.live and not row.settled:
                status = "pending: estimate, not settled yet"
        charged = "-" if row.charged_usd is None else f"{row.charged_usd:.6f}"
        diff = round(row.diff_usd, 6) + 0.0  # + 0.0 turns -0.0 into 0.0
        table.add_row(str(row.instance_id), row.job_id or "-", str(row.attempt or "-"),
                      f"{row.journal_usd:.6f}", charged, f"{diff:+.6f}", status)
    console().print(table)
    if any(not (row.matches or row.live or row.settled) for row in checked):
        typer.echo("The supervisor settles each destroyed instance against the charges "
                   "(supervise --settle-delay-s, 300 s by default); until then the journal "
                   "shows its own estimate.")
