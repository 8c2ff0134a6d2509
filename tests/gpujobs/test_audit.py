"""`gpujobs audit`: filters, exports, views and read-only SQL on a real journal file."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from journal import (
    CorruptJournal,
    EventStore,
    InvalidQuery,
    JournalLocked,
    ReadOnlyViolation,
)

from gpujobs import events as ev
from gpujobs.audit import AuditFilters, parse_time, query_events, write_csv, write_jsonl
from gpujobs.cli import app
from gpujobs.errors import GpujobsError, JobNotFound
from gpujobs.projections import JobsProjection
from gpujobs.views import create_views, view_statements

REPO_ROOT = Path(__file__).resolve().parents[2]


def submitted(job_id: str, team: str, project: str) -> ev.JobSubmitted:
    return ev.JobSubmitted(
        job_id=job_id, name="digits", team=team, project=project, profile_name="dev-test",
        profile={"name": "dev-test", "max_dph": 0.25}, spec={"total_steps": 100},
    )


def history(job_id: str, team: str, project: str, dph: float) -> list[list[ev.JobEvent]]:
    """Appends of one job that ran, was billed twice and finished; one list per append."""
    label = f"gpujobs:{job_id}:1"
    return [
        [submitted(job_id, team, project)],
        [ev.OfferSelected(1, 7, 70, 700, "RTX 4090", 1, dph, 0.95, None),
         ev.InstanceRequested(1, 7, label)],
        [ev.InstanceCreated(1, 1001, label, dph)],
        [ev.WorkerStarted(1, 0)],
        [ev.CostAccrued(1, 1001, 0.25, 900.0, dph, 1000.0)],
        [ev.CheckpointStarted(1, 50)],
        [ev.CheckpointSaved(1, 50, "file:///ckpt/50", "ab" * 32, 10)],
        [ev.CostAccrued(1, 1001, 0.5, 1800.0, dph, 2000.0)],
        [ev.JobCompleted(1, 100, {"accuracy": 0.97})],
    ]


@pytest.fixture
async def journal(tmp_path):
    """Two jobs of different teams, appended in turns; returns (path, recorded events)."""
    path = tmp_path / "journal.db"
    recorded = []
    async with await EventStore.open(path, projections=[JobsProjection()]) as store:
        plans = [history("job-a", "research", "vision", 1.0),
                 history("job-b", "infra", "llm", 2.0)]
        versions = {"job-a": 0, "job-b": 0}
        for round_number in range(len(plans[0])):
            for job_id, plan in zip(versions, plans):
                batch = [event.to_new_event() for event in plan[round_number]]
                events = await store.append(job_id, batch, expected_version=versions[job_id])
                versions[job_id] += len(events)
                recorded.extend(events)
    conn = sqlite3.connect(path, isolation_level=None)
    create_views(conn)
    conn.close()
    return path, recorded


def seqs(rows: list[dict]) -> list[int]:
    return [row["seq"] for row in rows]


async def test_no_filter_lists_all_in_order(journal):
    path, recorded = journal
    rows = query_events(path, AuditFilters())
    assert seqs(rows) == [event.seq for event in recorded]
    assert rows[0]["type"] == "JobSubmitted"
    assert rows[0]["team"] == "research"
    assert rows[0]["recorded_utc"].endswith("Z")


async def test_filter_by_job_and_type(journal):
    path, recorded = journal
    rows = query_events(path, AuditFilters(job="job-b", types=("CostAccrued",)))
    expected = [e.seq for e in recorded if e.stream == "job-b" and e.type == "CostAccrued"]
    assert seqs(rows) == expected
    assert len(expected) == 2
    assert [row["data"]["amount_usd"] for row in rows] == [0.25, 0.5]
    assert all(row["attempt"] == 1 for row in rows)


async def test_repeated_type_filter(journal):
    path, recorded = journal
    types = ("CheckpointStarted", "CheckpointSaved")
    rows = query_events(path, AuditFilters(types=types))
    assert seqs(rows) == [e.seq for e in recorded if e.type in types]
    assert len(rows) == 4


async def test_filter_by_team_and_project(journal):
    path, recorded = journal
    job_a = [e.seq for e in recorded if e.stream == "job-a"]
    assert seqs(query_events(path, AuditFilters(team="research"))) == job_a
    assert seqs(query_events(path, AuditFilters(project="vision"))) == job_a
    assert query_events(path, AuditFilters(team="research", project="llm")) == []


async def test_since_until_inclusive(journal):
    path, recorded = journal
    middle = recorded[6].recorded_at
    later = recorded[12].recorded_at
    rows = query_events(path, AuditFilters(since=middle, until=later))
    assert seqs(rows) == [e.seq for e in recorded if middle <= e.recorded_at <= later]
    assert rows[0]["recorded_at"] == middle
    assert rows[-1]["recorded_at"] == later


async def test_limit_keeps_newest(journal):
    path, recorded = journal
    rows = query_events(path, AuditFilters(limit=3))
    assert seqs(rows) == [e.seq for e in recorded[-3:]]


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        (AuditFilters(limit=0), "invalid --limit 0; use a number of events from 1 to"),
        (AuditFilters(types=("Bogus",)), "unknown event type 'Bogus'; use one of: "),
        (AuditFilters(since=20.0, until=10.0), "--since (1970-01-01T00:00:20.000Z) is after"),
    ],
)
async def test_invalid_filter_rejected(journal, filters, message):
    path, _ = journal
    with pytest.raises(GpujobsError) as caught:
        query_events(path, filters)
    assert str(caught.value).startswith(message)


async def test_unknown_job_raises_not_found(journal):
    path, _ = journal
    with pytest.raises(JobNotFound, match="no job 'job-x' in the journal"):
        query_events(path, AuditFilters(job="job-x"))


def test_parse_time_forms():
    assert parse_time("1796402612.5") == 1796402612.5
    assert parse_time("1970-01-01T00:01:00") == 60.0
    assert parse_time("1970-01-01T01:00:00+01:00") == 0.0
    assert parse_time("2030") == parse_time("2030-01-01T00:00:00")
    assert parse_time("2030-06") == parse_time("2030-06-01T00:00:00")
    assert parse_time("100000") == 100000.0  # more than four digits: unix seconds
    with pytest.raises(GpujobsError, match="invalid time 'yesterday'; use ISO 8601"):
        parse_time("yesterday")


async def test_csv_round_trip(journal):
    path, recorded = journal
    rows = query_events(path, AuditFilters(job="job-a"))
    buffer = io.StringIO()
    write_csv(rows, buffer)

    parsed = list(csv.DictReader(io.StringIO(buffer.getvalue())))
    assert [int(r["seq"]) for r in parsed] == seqs(rows)
    assert [json.loads(r["data"]) for r in parsed] == [row["data"] for row in rows]
    assert [r["hash"] for r in parsed] == [e.hash for e in recorded if e.stream == "job-a"]
    assert parsed[0]["attempt"] == ""
    assert parsed[1]["attempt"] == "1"


async def test_jsonl_round_trip(journal):
    path, _ = journal
    rows = query_events(path, AuditFilters(types=("JobCompleted",)))
    buffer = io.StringIO()
    write_jsonl(rows, buffer)

    lines = buffer.getvalue().splitlines()
    assert len(lines) == 2
    assert [json.loads(line) for line in lines] == rows


async def test_job_costs_view_sums_per_team(journal):
    path, _ = journal
    conn = sqlite3.connect(path)
    try:
        totals = dict(conn.execute(
            "SELECT team, SUM(amount_usd) FROM job_costs GROUP BY team"
        ).fetchall())
        attempts = conn.execute(
            "SELECT job_id, attempt, gpu_name, instance_id, billed_s, accruals FROM job_costs "
            "ORDER BY job_id"
        ).fetchall()
    finally:
        conn.close()
    assert totals == {"research": 0.75, "infra": 0.75}
    assert attempts == [("job-a", 1, "RTX 4090", 1001, 2700.0, 2),
                        ("job-b", 1, "RTX 4090", 1001, 2700.0, 2)]


async def test_job_transitions_view_states(journal):
    path, _ = journal
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT event, from_state, to_state, attempt FROM job_transitions "
            "WHERE job_id = 'job-a' ORDER BY seq"
        ).fetchall()
    finally:
        conn.close()
    assert rows == [
        ("OfferSelected", "queued", "provisioning", 1),
        ("WorkerStarted", "provisioning", "running", 1),
        ("CheckpointStarted", "running", "checkpointing", 1),
        ("CheckpointSaved", "checkpointing", "running", 1),
        ("JobCompleted", "running", "done", 1),
    ]


async def test_job_events_view_joins_job(journal):
    path, recorded = journal
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT seq, team, project, job_state FROM job_events WHERE type = 'JobSubmitted' "
            "ORDER BY seq"
        ).fetchall()
    finally:
        conn.close()
    first_seqs = [e.seq for e in recorded if e.type == "JobSubmitted"]
    assert rows == [(first_seqs[0], "research", "vision", "done"),
                    (first_seqs[1], "infra", "llm", "done")]


async def test_create_views_replaces_changed_view(journal):
    path, _ = journal
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("DROP VIEW job_costs")
        conn.execute("CREATE VIEW job_costs AS SELECT 1 AS stale")
        create_views(conn)
        stored = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'view'"))
    finally:
        conn.close()
    assert stored == view_statements()


# Through the CLI, with the journal found by GPUJOBS_HOME.

@pytest.fixture
def cli_home(journal, monkeypatch):
    path, recorded = journal
    monkeypatch.setenv("GPUJOBS_HOME", str(path.parent))
    return path, recorded


def invoke(*args: str):
    return CliRunner().invoke(app, ["audit", *args])


def test_cli_lists_events_as_json(cli_home):
    _, recorded = cli_home
    result = invoke("--job", "job-a", "--type", "CostAccrued", "--type", "JobCompleted", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    expected_types = ("CostAccrued", "JobCompleted")
    expected = [e.seq for e in recorded if e.stream == "job-a" and e.type in expected_types]
    assert [row["seq"] for row in rows] == expected


def test_cli_exports_csv(cli_home):
    _, recorded = cli_home
    result = invoke("--team", "infra", "--format", "csv")
    assert result.exit_code == 0, result.output
    parsed = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [int(r["seq"]) for r in parsed] == [e.seq for e in recorded if e.stream == "job-b"]


def test_cli_plain_audit_prints_table(cli_home, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    result = invoke("--limit", "2")
    assert result.exit_code == 0, result.output
    assert "JobCompleted" in result.stdout
    assert "JobSubmitted" not in result.stdout


def test_cli_rejects_unknown_format(cli_home):
    result = invoke("--format", "xml")
    assert isinstance(result.exception, GpujobsError)
    assert str(result.exception) == "invalid --format 'xml'; use one of: table, csv, jsonl"


def test_cli_sql_reads_view(cli_home):
    result = invoke("sql", "SELECT team, SUM(amount_usd) AS usd FROM job_costs GROUP BY team "
                    "ORDER BY team", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [{"team": "infra", "usd": 0.75},
                                         {"team": "research", "usd": 0.75}]


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("DELETE FROM events", "DELETE"),
        ("UPDATE jobs SET state = 'done'", "UPDATE"),
        ("INSERT INTO jobs (job_id) VALUES ('x')", "INSERT"),
        ("DROP TABLE jobs", "DROP"),
        ("ATTACH DATABASE ':memory:' AS other", "ATTACH"),
        ("PRAGMA user_version=7", "PRAGMA user_version=7"),
        ("PRAGMA journal_mode=DELETE", "PRAGMA journal_mode=DELETE"),
    ],
)
def test_cli_sql_rejects_writes(cli_home, sql, kind):
    path, _ = cli_home
    before = path.read_bytes()
    result = invoke("sql", sql)
    assert isinstance(result.exception, ReadOnlyViolation), result.output
    assert str(result.exception) == (
        f"rejected {kind}: audit queries are read-only; use SELECT or a PRAGMA that only reads"
    )
    assert path.read_bytes() == before


def tamper(path: Path, seq: int, data: str = '{"amount_usd":0.01}') -> None:
    """Change one event's data behind the triggers' back, as an attacker with the file could."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("DROP TRIGGER events_reject_update")
        conn.execute("UPDATE events SET data = ? WHERE seq = ?", (data, seq))
    finally:
        conn.close()


@pytest.mark.parametrize("output", [(), ("--format", "jsonl"), ("--format", "csv"), ("--json",)])
def test_cli_listing_names_undecodable_row(cli_home, output):
    path, recorded = cli_home
    tamper(path, recorded[2].seq, "{not json")

    result = invoke(*output)

    assert isinstance(result.exception, CorruptJournal), result.output
    assert str(result.exception).startswith(f"event seq {recorded[2].seq} has undecodable data")


def test_cli_verify_names_tampered_row(cli_home):
    path, recorded = cli_home
    assert invoke("verify").stdout == f"ok: {len(recorded)} events, chain verified\n"

    cost = next(e for e in recorded if e.type == "CostAccrued")
    tamper(path, cost.seq)
    result = invoke("verify")
    assert result.exit_code == 1
    assert f"fails verification at seq {cost.seq}: seq {cost.seq}: stored hash" in result.output


def test_verify_subprocess_exit_codes(cli_home):
    path, recorded = cli_home
    env = {**os.environ, "GPUJOBS_HOME": str(path.parent)}
    command = [str(Path(sys.executable).with_name("gpujobs")), "audit", "verify"]

    intact = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert intact.returncode == 0, intact.stderr
    assert intact.stdout == f"ok: {len(recorded)} events, chain verified\n"

    tamper(path, recorded[3].seq)
    broken = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert broken.returncode == 1
    assert f"fails verification at seq {recorded[3].seq}" in broken.stderr


def test_cli_sql_lock_wait_counts_toward_timeout(cli_home):
    path, _ = cli_home
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("SELECT count(*) FROM events").fetchone()
        holder.execute("COMMIT")  # the exclusive lock stays until the connection closes
        result = invoke("sql", "--timeout-s", "1", "SELECT 1")
    finally:
        holder.close()

    assert isinstance(result.exception, JournalLocked), result.output
    assert "held its lock for more than 1 s; stop the other writer, or raise --timeout-s" in str(
        result.exception)


def test_cli_sql_unknown_column_named_locked(cli_home):
    result = invoke("sql", "SELECT locked FROM events")

    assert isinstance(result.exception, InvalidQuery), result.output
    assert "no such column: locked" in str(result.exception)


def test_cli_sql_reads_pragma_function(cli_home):
    result = invoke("sql", "SELECT name FROM pragma_table_info('jobs') WHERE cid = 0", "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [{"name": "job_id"}]
