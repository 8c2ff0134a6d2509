"""The status table fits the terminal by leaving out columns, never by cutting ids or figures."""

from __future__ import annotations

import io
import sys

import pytest
from rich.console import Console

from gpujobs.cli_console import PIPED_WIDTH, console
from gpujobs.cli_status import status_table
from gpujobs.jobs import JobStatus


def job(job_id: str, profile: str, reason: str | None = None) -> JobStatus:
    return JobStatus(job_id=job_id, name="digits", state="checkpointing", attempt=12,
                     profile=profile, team="research", project="vision", step=12345,
                     total_steps=100000, last_checkpoint_step=12300, preemptions=3,
                     cost_usd=123.4567, reason=reason, instance_id=7)


JOBS = [job("second-long-name-66d5ec", "training-distributed"),
        job("first-0cbcea", "dev-test", "waiting: team research is over its daily budget")]


def render(width: int) -> tuple[list[str], str]:
    table = status_table(JOBS, width)
    out = io.StringIO()
    Console(file=out, width=width).print(table)
    return [str(column.header) for column in table.columns], out.getvalue()


@pytest.mark.parametrize("width", [80, 100, 120, 200])
def test_ids_and_figures_never_cut(width: int) -> None:
    _, text = render(width)

    for figure in ("second-long-name-66d5ec", "first-0cbcea", "checkpointing",
                   "12345/100000", "123.4567"):
        assert figure in text
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width


def test_narrow_terminal_leaves_out_columns() -> None:
    headers, _ = render(80)

    assert headers == ["job", "state", "step", "cost $", "reason"]


def test_wide_terminal_keeps_every_column() -> None:
    headers, text = render(200)

    assert headers == ["job", "state", "att", "profile", "team/project", "step", "ckpt", "pre",
                       "cost $", "reason"]
    assert "waiting: team research is over its daily budget" in text


def test_no_jobs_gives_headers_only() -> None:
    table = status_table([], 80)

    assert [str(column.header) for column in table.columns][:2] == ["job", "state"]
    assert table.row_count == 0


def test_piped_console_is_not_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # not a terminal, even under pytest -s

    assert console().width == PIPED_WIDTH

    monkeypatch.setenv("COLUMNS", "90")
    assert console().width == 90
