"""`gpujobs replay` and the audit commands that read history, on a real journal file."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpujobs.audit import iso_utc
from gpujobs.cli import app
from gpujobs.errors import GpujobsError

# The `journal` fixture (two jobs of two teams, each submitted, billed, checkpointed and
# completed) comes from test_audit.py.
from tests.gpujobs.test_audit import journal  # noqa: F401


@pytest.fixture
def home(journal, monkeypatch):  # noqa: F811
    path, recorded = journal
    monkeypatch.setenv("GPUJOBS_HOME", str(path.parent))
    monkeypatch.setenv("COLUMNS", "200")
    return path, recorded


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def replay_json(*args: str) -> dict:
    result = invoke("replay", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def first_event(recorded, job_id: str, event_type: str):
    return next(e for e in recorded if e.stream == job_id and e.type == event_type)


def test_replay_at_shows_state_then(home):
    _, recorded = home
    started = first_event(recorded, "job-a", "CheckpointStarted")
    saved = first_event(recorded, "job-a", "CheckpointSaved")

    during = replay_json("--job", "job-a", "--at", repr(started.recorded_at))
    assert during["state"] == "checkpointing"
    assert during["last_checkpoint_step"] is None
    assert during["cost_usd"] == pytest.approx(0.25)
    assert during["as_of"] == started.recorded_at

    after = replay_json("--job", "job-a", "--at", repr(saved.recorded_at))
    assert after["state"] == "running"
    assert after["last_checkpoint_step"] == 50
    assert [t["to"] for t in after["transitions"]][-2:] == ["checkpointing", "running"]

    final = replay_json("--job", "job-a")
    assert final["state"] == "done"
    assert final["cost_usd"] == pytest.approx(0.75)


def test_replay_at_takes_iso_time(home):
    _, recorded = home
    completed = first_event(recorded, "job-b", "JobCompleted")
    # ISO 8601 with milliseconds rounds down, so one millisecond later includes the event.
    moment = iso_utc(completed.recorded_at + 0.001).rstrip("Z")
    assert replay_json("--job", "job-b", "--at", moment)["state"] == "done"


def test_replay_at_before_first_event(home):
    _, recorded = home
    submitted = first_event(recorded, "job-a", "JobSubmitted")
    result = invoke("replay", "--job", "job-a", "--at", repr(submitted.recorded_at - 60))
    assert isinstance(result.exception, GpujobsError)
    message = str(result.exception)
    assert message.startswith("job job-a has no events at or before ")
    assert message.endswith(f"recorded at {iso_utc(submitted.recorded_at)}, so give a later --at")


def test_replay_table_lists_transitions(home):
    result = invoke("replay", "--job", "job-a")
    assert result.exit_code == 0, result.output
    assert "job job-a: done, 1 attempt, 0 preemptions" in result.stdout
    for state in ("queued", "provisioning", "running", "checkpointing", "done"):
        assert state in result.stdout


def damage(path: Path, sql: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(sql)
    finally:
        conn.close()


def test_replay_check_passes_intact_journal(home):
    _, recorded = home
    result = invoke("replay", "--all", "--check")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"ok: {len(recorded)} events replayed; projections match\n"


def test_replay_check_names_damaged_cell(home):
    path, _ = home
    damage(path, "UPDATE jobs SET cost_usd = 9.99 WHERE job_id = 'job-a'")
    result = invoke("replay", "--all", "--check")
    assert result.exit_code == 1
    assert "jobs job-a cost_usd: stored 9.99, replayed 0.75" in result.stdout

    checked = invoke("replay", "--all", "--check", "--json")
    assert checked.exit_code == 1
    differences = json.loads(checked.stdout)["differences"]
    assert differences == [{"table": "jobs", "key": "job-a", "column": "cost_usd",
                            "stored": 9.99, "replayed": 0.75}]


def test_replay_check_names_missing_row(home):
    path, _ = home
    damage(path, "DELETE FROM attempts WHERE job_id = 'job-b'")
    result = invoke("replay", "--all", "--check", "--json")
    assert result.exit_code == 1
    differences = json.loads(result.stdout)["differences"]
    assert differences == [{"table": "attempts", "key": "('job-b', 1)", "column": "*",
                            "stored": False, "replayed": True}]


def test_audit_since_until_through_cli(home):
    _, recorded = home
    window = recorded[4:9]
    result = invoke("audit", "--since", repr(window[0].recorded_at),
                    "--until", repr(window[-1].recorded_at), "--json")
    assert result.exit_code == 0, result.output
    assert [row["seq"] for row in json.loads(result.stdout)] == [e.seq for e in window]


def test_audit_rejects_bad_time(home):
    result = invoke("audit", "--since", "yesterday")
    assert isinstance(result.exception, GpujobsError)
    assert str(result.exception) == (
        "invalid time 'yesterday'; use ISO 8601 (2026-12-04 or 2026-12-04T16:30:00) "
        "or unix seconds"
    )


def test_audit_sql_prints_table(home):
    result = invoke("audit", "sql", "SELECT job_id, state FROM jobs ORDER BY job_id")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if "job-" in line]
    assert len(lines) == 2
    assert "job-a" in lines[0]
    assert "done" in lines[0]
    assert "job-b" in lines[1]
    assert "done" in lines[1]


def test_audit_head_then_verify(home):
    path, recorded = home
    head = invoke("audit", "head")
    assert head.exit_code == 0, head.output
    assert head.stdout == f"{recorded[-1].seq}:{recorded[-1].hash}\n"
    as_json = json.loads(invoke("audit", "head", "--json").stdout)
    assert as_json == {"seq": recorded[-1].seq, "hash": recorded[-1].hash}

    result = invoke("audit", "verify", "--head", head.stdout.strip())
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"ok: {len(recorded)} events, chain verified, head seq {recorded[-1].seq} matches\n"
    )


def test_verify_head_catches_deleted_tail(home):
    """Deleting the newest rows keeps the chain valid; only the recorded head shows it."""
    path, recorded = home
    head = f"{recorded[-1].seq}:{recorded[-1].hash}"
    damage(path, "DROP TRIGGER events_reject_delete")
    damage(path, f"DELETE FROM events WHERE seq > {recorded[-3].seq}")

    plain = invoke("audit", "verify")
    assert plain.exit_code == 0, plain.output

    anchored = invoke("audit", "verify", "--head", head)
    assert anchored.exit_code == 1
    assert (f"fails verification at seq {recorded[-1].seq}: seq {recorded[-1].seq} of the "
            f"recorded head is missing: the journal ends at seq {recorded[-3].seq}"
            in anchored.output)


def test_verify_head_catches_rewritten_row(home):
    path, recorded = home
    head = f"{recorded[-1].seq}:{'0' * 64}"
    result = invoke("audit", "verify", "--head", head)
    assert result.exit_code == 1
    assert f"seq {recorded[-1].seq} has hash {recorded[-1].hash[:16]}..." in result.output


@pytest.mark.parametrize("text", [
    "12", "x:" + "a" * 64, "3:abc", "3:" + "G" * 64, "0:" + "a" * 64,
    "99999999999999999999:" + "a" * 64, "\u0663:" + "a" * 64, "9" * 5000 + ":" + "a" * 64,
])
def test_verify_rejects_malformed_head(home, text):
    result = invoke("audit", "verify", "--head", text)
    assert isinstance(result.exception, GpujobsError)
    assert str(result.exception) == (
        f"invalid --head {text!r}; use SEQ:HASH as printed by `gpujobs audit head`"
    )


@pytest.mark.parametrize(("args", "message"), [
    (("--all", "--job", "job-a"), "--all replays every job to now; leave out --job and --at"),
    (("--all", "--at", "2026-01-01"), "--all replays every job to now; leave out --job and --at"),
    (("--job", "job-a", "--check"), "--check compares every stored projection; use it with --all"),
])
def test_replay_rejects_mixed_options(home, args, message):
    result = invoke("replay", *args)
    assert isinstance(result.exception, GpujobsError)
    assert str(result.exception).startswith(message)


def test_replay_rejects_supervisor_stream(home):
    result = invoke("replay", "--job", "supervisor")
    assert isinstance(result.exception, GpujobsError)
    assert str(result.exception) == (
        "'supervisor' is the supervisor's own stream, not a job; list its events with "
        "`gpujobs audit --job supervisor`"
    )
