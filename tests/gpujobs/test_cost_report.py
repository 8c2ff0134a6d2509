"""`gpujobs cost-report`: grouping, time windows, formats, reconcile and the plot."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from gpujobs import events as ev
from gpujobs.cli_cost import cost_report
from gpujobs.cost import job_costs
from gpujobs.cost_report import (
    StoredEvent, format_rows, parse_time, plot_report, reconcile, report_rows,
)
from gpujobs.emulator import Emulator
from gpujobs.errors import GpujobsError
from gpujobs.jobs import open_journal
from gpujobs.settings import load_settings
from gpujobs.vast.client import VastClient
from tests.gpujobs.test_cost import history

MIDNIGHT = datetime(2026, 12, 5, tzinfo=timezone.utc).timestamp()


def shifted(stream: str, team: str, project: str, offset_s: float) -> list[StoredEvent]:
    events = []
    for event in history():
        data = dict(event.data)
        if event.type == "JobSubmitted":
            data.update(team=team, project=project, name=stream)
        if event.type == "CostAccrued":
            data["through"] += offset_s
        events.append(StoredEvent(event.seq, stream, event.type, data,
                                  event.recorded_at + offset_s))
    return events


def two_jobs() -> list[Any]:
    # Job "a" runs at 1000-1220 s; job "b" straddles midnight UTC.
    return job_costs(shifted("a", "red", "x", 0.0) + shifted("b", "blue", "y",
                                                             MIDNIGHT - 1100.0))


def test_rows_by_team_and_project() -> None:
    rows = report_rows(two_jobs(), "team")
    assert [r.group for r in rows] == ["blue", "red"]  # equal cost: ordered by name
    assert rows[0].cost_usd == pytest.approx(0.154)
    assert rows[0].useful_usd == pytest.approx(0.06)
    assert rows[0].waste_usd == pytest.approx(0.094)
    assert rows[0].waste_pct == pytest.approx(100 * 0.094 / 0.154)
    assert (rows[0].jobs, rows[0].attempts) == (1, 2)
    assert [r.group for r in report_rows(two_jobs(), "project")] == ["blue/y", "red/x"]


def test_rows_by_gpu_and_job() -> None:
    rows = {r.group: r for r in report_rows(two_jobs(), "gpu")}
    assert rows["RTX 4090"].cost_usd == pytest.approx(0.22)
    assert rows["RTX 3090"].cost_usd == pytest.approx(0.088)
    assert rows["RTX 4090"].attempts == 2
    assert {r.group for r in report_rows(two_jobs(), "job")} == {"a", "b"}


def test_rows_by_day_split_at_midnight() -> None:
    rows = report_rows(two_jobs(), "day")
    assert [r.group for r in rows] == ["1970-01-01", "2026-12-04", "2026-12-05"]
    # Job b: 1010-1100 s before its midnight offset is $0.09 of attempt 1's $0.11.
    assert rows[1].cost_usd == pytest.approx(0.09)
    assert rows[2].cost_usd == pytest.approx(0.154 - 0.09)


def test_window_prorates_segments() -> None:
    rows = report_rows(two_jobs(), "team", since=1010.0, until=1035.0)
    assert [r.group for r in rows] == ["red"]
    assert rows[0].cost_usd == pytest.approx(0.025)
    assert rows[0].provisioning_usd == pytest.approx(0.02)


def test_json_and_csv_formats() -> None:
    rows = report_rows(two_jobs(), "team")
    data = json.loads(format_rows(rows, "team", "json"))
    assert data["by"] == "team"
    assert data["total"]["cost_usd"] == pytest.approx(0.308)
    assert data["rows"][0]["group"] == "blue"
    table = list(csv.DictReader(io.StringIO(format_rows(rows, "team", "csv"))))
    assert table[0]["team"] == "blue"
    assert float(table[1]["lost_usd"]) == pytest.approx(0.03)
    assert list(table[0]) == ["team", "jobs", "attempts", "cost_usd", "useful_usd",
                              "provisioning_usd", "lost_usd", "idle_usd", "waste_usd",
                              "waste_pct"]


def test_invalid_grouping_and_time() -> None:
    with pytest.raises(GpujobsError) as caught:
        report_rows(two_jobs(), "host")
    assert str(caught.value) == "invalid grouping 'host'; use one of team, project, job, gpu, day"
    with pytest.raises(GpujobsError) as bad_time:
        parse_time("yesterday")
    assert str(bad_time.value) == ("invalid time 'yesterday'; use ISO 8601 (2026-12-04 or "
                                   "2026-12-04T16:30:00) or unix seconds")
    assert parse_time("2026-12-05") == MIDNIGHT
    assert parse_time("12.5") == 12.5


class ChargesStub:
    """Stands in for VastClient.charges in this module's unit test only."""

    def __init__(self, charges: list[dict[str, Any]]) -> None:
        self.charges_list = charges
        self.windows: list[tuple[float, float]] = []

    async def charges(self, *, start: float, end: float) -> list[dict[str, Any]]:
        self.windows.append((start, end))
        return self.charges_list


async def test_reconcile_flags_differences() -> None:
    costs = job_costs(shifted("a", "red", "x", 0.0))
    stub = ChargesStub([
        {"type": "instance", "source": "instance-11", "amount": 0.1105},
        {"type": "instance", "source": "instance-22", "amount": 0.05},
        {"type": "instance", "source": "instance-33", "amount": 1.0},
    ])
    rows = {row.instance_id: row for row in await reconcile(costs, stub, until=2000.0)}
    assert stub.windows == [(1010.0, 2000.0)]
    assert rows[11].matches
    assert not rows[22].matches
    assert rows[22].diff_usd == pytest.approx(-0.006)
    assert rows[33].job_id is None
    assert not rows[33].matches


async def _journal(home: Path, instance_id: int = 77,
                   amounts: tuple[float, float] = (0.25, 0.05),
                   settled_usd: float | None = None) -> None:
    """Journal one finished job billed on `instance_id` at the two amounts, times now.

    With `settled_usd`, the instance is then settled at that whole charge.
    """
    store = await open_journal(load_settings(home=home))
    history = [
        ev.JobSubmitted("j1", "j", "red", "x", "dev-test", {}, {}),
        ev.OfferSelected(1, 501, 9, 4242, "RTX 4090", 1, 0.2, 0.99, None),
        ev.InstanceRequested(1, 501, "gpujobs:j1:1"),
        ev.InstanceCreated(1, instance_id, "gpujobs:j1:1", 0.2),
        ev.WorkerStarted(1, 0),
        ev.CostAccrued(1, instance_id, amounts[0], 4500.0, 0.2, 0.0),
        ev.JobCompleted(1, 10),
        ev.InstanceDestroyRequested(1, instance_id, "job done"),
        ev.CostAccrued(1, instance_id, amounts[1], 900.0, 0.2, 0.0),
        ev.InstanceDestroyed(1, instance_id),
    ]
    if settled_usd is not None:
        history.append(ev.CostAccrued(1, instance_id, settled_usd - sum(amounts), 0.0, 0.2, 0.0,
                                      settled_usd=settled_usd))
    try:
        for event in history:
            if isinstance(event, ev.CostAccrued):
                event = ev.CostAccrued(1, instance_id, event.amount_usd, event.billed_s, 0.2,
                                       time.time(), settled_usd=event.settled_usd)
            version = await store.stream_version("j1")
            await store.append("j1", [event.to_new_event()], expected_version=version)
    finally:
        await store.close()


def command_app() -> typer.Typer:
    app = typer.Typer()
    app.command()(cost_report)
    return app


async def test_command_formats_from_journal(tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("GPUJOBS_HOME", str(home))
    monkeypatch.setenv("COLUMNS", "200")
    await _journal(home)
    runner = CliRunner()
    result = await asyncio.to_thread(runner.invoke, command_app(), ["--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["rows"][0]["group"] == "red"
    assert data["total"]["cost_usd"] == pytest.approx(0.30)
    csv_out = await asyncio.to_thread(runner.invoke, command_app(),
                                      ["--by", "gpu", "--format", "csv"])
    assert csv_out.output.splitlines()[0].startswith("gpu,jobs,attempts,cost_usd")
    assert "RTX 4090,1,1,0.3," in csv_out.output
    table = await asyncio.to_thread(runner.invoke, command_app(), ["--by", "job"])
    assert table.exit_code == 0, table.output
    assert "j1" in table.output
    assert "total" in table.output
    bad = await asyncio.to_thread(runner.invoke, command_app(), ["--by", "host"])
    assert bad.exit_code != 0
    assert str(bad.exception) == "invalid --by 'host'; use one of team, project, job, gpu, day"


async def test_command_without_journal(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GPUJOBS_HOME", str(tmp_path / "empty"))
    result = await asyncio.to_thread(CliRunner().invoke, command_app(), [])
    assert result.exit_code != 0
    assert str(result.exception) == (f"no journal at {tmp_path / 'empty' / 'journal.db'}; "
                                     "submit a job first or check GPUJOBS_HOME")
    assert not (tmp_path / "empty").exists()


def test_plot_writes_png(tmp_path: Path) -> None:
    path = plot_report(two_jobs(), tmp_path / "spend.png", "project")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_plot_rejects_other_groupings(tmp_path: Path) -> None:
    for by in ("job", "gpu", "day"):
        with pytest.raises(GpujobsError) as caught:
            plot_report(two_jobs(), tmp_path / "spend.png", by)
        assert str(caught.value) == (f"--plot draws spend per team or project, not per {by}; "
                                     "use --by team or --by project with --plot")
    assert not (tmp_path / "spend.png").exists()


async def invoke(*args: str) -> Any:
    return await asyncio.to_thread(CliRunner().invoke, command_app(), list(args))


async def test_command_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("GPUJOBS_HOME", str(home))
    await _journal(home)
    png = tmp_path / "spend.png"
    result = await invoke("--by", "project", "--plot", str(png), "--format", "json")
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(result.stdout)["total"]["cost_usd"] == pytest.approx(0.30)
    bad = await invoke("--by", "gpu", "--plot", str(tmp_path / "gpu.png"))
    assert bad.exit_code != 0
    assert str(bad.exception) == ("--plot draws spend per team or project, not per gpu; use "
                                  "--by team or --by project with --plot")
    assert not (tmp_path / "gpu.png").exists()


async def test_command_since_until(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("GPUJOBS_HOME", str(home))
    await _journal(home)
    now = time.time()
    hour_ago = datetime.fromtimestamp(now - 3600, tz=timezone.utc).isoformat()
    cases = [
        (["--since", hour_ago], 0.30),
        (["--since", hour_ago, "--until", str(now + 3600)], 0.30),
        (["--since", str(now + 3600)], 0.0),
        (["--until", str(now - 3600)], 0.0),
    ]
    for window, expected in cases:
        result = await invoke("--format", "json", *window)
        assert result.exit_code == 0, (window, result.output)
        total = json.loads(result.output)["total"]["cost_usd"]
        assert total == pytest.approx(expected), window
    bad = await invoke("--since", "yesterday")
    assert bad.exit_code != 0
    assert str(bad.exception) == ("invalid time 'yesterday'; use ISO 8601 (2026-12-04 or "
                                  "2026-12-04T16:30:00) or unix seconds")


@pytest.fixture
async def emulator(tmp_path: Path) -> Any:
    emu = Emulator(seed=5, rate_limits=False, workdir=tmp_path / "emu", time_scale=3600.0,
                   loading_s=0.1)
    url = await emu.start()
    yield emu, url
    await emu.stop()


async def rent_and_destroy(emu: Emulator, url: str) -> tuple[int, float]:
    """Rent the cheapest offer for a moment, then destroy it; returns (instance id, cost)."""
    async with VastClient(api_key=emu.api_key, base_url=url) as client:
        offer = (await client.search_offers(order=[("dph_total", "asc")], limit=1))[0]
        instance_id = await client.create_instance(offer.id, image="gpujobs/worker:latest",
                                                   onstart="sleep 30")
        await asyncio.sleep(0.3)
        await client.destroy_instance(instance_id)
    (row,) = [row for row in emu.ledger() if row["id"] == instance_id]
    return instance_id, row["cost_usd"]


async def test_command_reconcile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 emulator: Any) -> None:
    emu, url = emulator
    monkeypatch.setenv("VAST_URL", url)
    monkeypatch.setenv("VAST_API_KEY", emu.api_key)
    monkeypatch.setenv("COLUMNS", "200")
    rented_from = str(time.time() - 1.0)
    instance_id, charged_usd = await rent_and_destroy(emu, url)
    assert charged_usd > 0.0

    # The journal below is written after the rent, so --since reaches back to include it.
    # The journal's cost equals the charge: exit status 0, the row reads ok.
    home = tmp_path / "home"
    monkeypatch.setenv("GPUJOBS_HOME", str(home))
    await _journal(home, instance_id, (charged_usd * 0.8, charged_usd * 0.2))
    matched = await invoke("--reconcile", "--format", "json", "--since", rented_from)
    assert matched.exit_code == 0, matched.output
    (row,) = json.loads(matched.stdout)["reconcile"]
    assert row["instance_id"] == instance_id
    assert row["charged_usd"] == pytest.approx(charged_usd, rel=0.01)
    assert row["matches"] is True

    # A journal that undercounts by half, not settled yet: its own estimate, so the row reads
    # pending and the exit status stays 0.
    other = tmp_path / "other"
    monkeypatch.setenv("GPUJOBS_HOME", str(other))
    await _journal(other, instance_id, (charged_usd * 0.4, charged_usd * 0.1))
    pending = await invoke("--reconcile", "--since", rented_from)
    assert pending.exit_code == 0, pending.output
    cells = reconcile_cells(pending.stdout, instance_id)
    assert cells[-1] == "pending: estimate, not settled yet"
    assert "settles each destroyed instance against the charges" in pending.stdout
    journal, charged, diff = (float(cell) for cell in cells[3:6])
    assert journal == pytest.approx(charged_usd * 0.5, abs=1e-6)
    assert charged == pytest.approx(charged_usd, rel=0.01)
    assert diff == pytest.approx(journal - charged, abs=2e-6)

    # Settled at half the charge: exit status 1, the row reads MISMATCH.
    settled = tmp_path / "settled"
    monkeypatch.setenv("GPUJOBS_HOME", str(settled))
    await _journal(settled, instance_id, (charged_usd * 0.4, charged_usd * 0.1),
                   settled_usd=charged_usd * 0.5)
    mismatched = await invoke("--reconcile", "--since", rented_from)
    assert mismatched.exit_code == 1, mismatched.output
    assert reconcile_cells(mismatched.stdout, instance_id)[-1] == "MISMATCH"


def reconcile_cells(output: str, instance_id: int) -> list[str]:
    line = next(line for line in output.splitlines() if str(instance_id) in line)
    return [cell.strip() for cell in line.strip("│ ").split("│")]
