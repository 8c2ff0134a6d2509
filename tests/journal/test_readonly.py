"""run_readonly_query: reads pass, every kind of write is rejected and the file is unchanged."""

from __future__ import annotations

import hashlib

import pytest

from journal import (
    EventStore,
    InvalidQuery,
    NewEvent,
    ReadOnlyViolation,
    run_readonly_query,
)


@pytest.fixture
async def journal_path(tmp_path):
    path = tmp_path / "journal.db"
    async with await EventStore.open(path) as store:
        await store.append("job-1", [NewEvent("JobSubmitted", {"gpu": "A100"})],
                           expected_version=0)
        await store.append("job-2", [NewEvent("JobSubmitted", {"gpu": "H100"})],
                           expected_version=0)
    return path


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_select_returns_columns_and_rows(journal_path):
    columns, rows = run_readonly_query(
        journal_path, "SELECT stream, json_extract(data, '$.gpu') AS gpu FROM events "
        "WHERE seq >= ? ORDER BY seq", (1,)
    )
    assert columns == ["stream", "gpu"]
    assert rows == [("job-1", "A100"), ("job-2", "H100")]


@pytest.mark.parametrize(
    "sql", ["PRAGMA table_info(events)", "PRAGMA user_version", "PRAGMA journal_mode",
            "PRAGMA integrity_check"]
)
async def test_read_pragmas_allowed(journal_path, sql):
    columns, rows = run_readonly_query(journal_path, sql)
    assert columns
    assert rows


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("DELETE FROM events", "DELETE"),
        ("UPDATE events SET type = 'x'", "UPDATE"),
        ("INSERT INTO events (seq) VALUES (99)", "INSERT"),
        ("DROP TABLE events", "DROP"),
        ("DROP TRIGGER events_reject_update", "DROP"),
        ("CREATE TABLE t (x)", "CREATE"),
        ("ALTER TABLE events ADD COLUMN x", "ALTER TABLE"),
        ("ATTACH DATABASE ':memory:' AS other", "ATTACH"),
        ("VACUUM INTO '/tmp/journal-copy-never-written.db'", "ATTACH"),
        ("PRAGMA journal_mode=DELETE", "PRAGMA journal_mode=DELETE"),
        ("PRAGMA user_version=5", "PRAGMA user_version=5"),
        ("PRAGMA query_only=OFF", "PRAGMA query_only=OFF"),
        ("PRAGMA wal_checkpoint(TRUNCATE)", "PRAGMA wal_checkpoint"),
    ],
)
async def test_writes_rejected(journal_path, sql, kind):
    before = digest(journal_path)

    with pytest.raises(ReadOnlyViolation) as caught:
        run_readonly_query(journal_path, sql)

    message = str(caught.value)
    assert f"rejected {kind}" in message
    assert "read-only" in message
    assert "\n" not in message
    assert digest(journal_path) == before


async def test_bad_sql_reported(journal_path):
    with pytest.raises(InvalidQuery, match="no such table"):
        run_readonly_query(journal_path, "SELECT * FROM jobs")


async def test_two_statements_reported(journal_path):
    with pytest.raises(InvalidQuery, match="one statement"):
        run_readonly_query(journal_path, "SELECT 1; DELETE FROM events")
