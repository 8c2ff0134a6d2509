"""Append-only triggers, the hash chain, and what verify() reports after tampering."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import pytest

from journal import CorruptJournal, EventStore, NewEvent, verify_file
from journal.encoding import (
    GENESIS_HASH, canonical_json, chain_hash, hash_encoded_row, json_string, json_time,
)


async def make_journal(path, count: int = 5) -> None:
    async with await EventStore.open(path) as store:
        for i in range(count):
            await store.append(f"job-{i % 2}", [NewEvent("Ticked", {"i": i})],
                               expected_version=i // 2)


def raw(path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


@pytest.mark.parametrize(
    ("statement", "kind"),
    [
        ("UPDATE events SET data = '{}' WHERE seq = 1", "UPDATE"),
        ("DELETE FROM events WHERE seq = 1", "DELETE"),
    ],
)
async def test_trigger_rejects_change(tmp_path, statement, kind):
    path = tmp_path / "journal.db"
    await make_journal(path)
    conn = raw(path)

    with pytest.raises(sqlite3.IntegrityError, match=f"append-only: {kind}"):
        conn.execute(statement)

    assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 5
    conn.close()


async def test_verify_intact_chain(tmp_path):
    path = tmp_path / "journal.db"
    await make_journal(path)

    result = verify_file(path)
    assert result.ok
    assert result.event_count == 5
    assert result.first_bad_seq is None
    assert result.reason is None


async def test_verify_names_edited_row(tmp_path):
    path = tmp_path / "journal.db"
    await make_journal(path)
    conn = raw(path)
    conn.execute("DROP TRIGGER events_reject_update")
    conn.execute("UPDATE events SET data = '{\"i\":99}' WHERE seq = 3")
    conn.close()

    async with await EventStore.open(path) as store:
        result = await store.verify()
    assert not result.ok
    assert result.first_bad_seq == 3
    assert result.event_count == 2
    assert "seq 3" in result.reason
    assert verify_file(path) == result


async def test_verify_names_deleted_row(tmp_path):
    path = tmp_path / "journal.db"
    await make_journal(path)
    conn = raw(path)
    conn.execute("DROP TRIGGER events_reject_delete")
    conn.execute("DELETE FROM events WHERE seq = 4")
    conn.close()

    result = verify_file(path)
    assert not result.ok
    assert result.first_bad_seq == 4
    assert "missing" in result.reason


async def test_verify_detects_rewritten_hash_chain_tail(tmp_path):
    path = tmp_path / "journal.db"
    await make_journal(path)
    conn = raw(path)
    conn.execute("DROP TRIGGER events_reject_update")
    conn.execute("UPDATE events SET hash = ? WHERE seq = 5", ("f" * 64,))
    conn.close()

    assert verify_file(path).first_bad_seq == 5


async def test_verify_detects_version_gap(tmp_path):
    path = tmp_path / "journal.db"
    await make_journal(path)
    conn = raw(path)
    conn.execute("DROP TRIGGER events_reject_update")
    conn.execute("UPDATE events SET version = 7 WHERE seq = 5")
    conn.close()

    result = verify_file(path)
    assert result.first_bad_seq == 5
    assert "version 7" in result.reason


async def test_undecodable_data_names_seq(tmp_path):
    path = tmp_path / "journal.db"
    await make_journal(path)
    conn = raw(path)
    conn.execute("DROP TRIGGER events_reject_update")
    conn.execute("UPDATE events SET data = 'not json' WHERE seq = 2")
    conn.close()

    async with await EventStore.open(path) as store:
        with pytest.raises(CorruptJournal, match="seq 2") as caught:
            await store.read_all()
    assert caught.value.seq == 2


async def test_verify_file_rejects_non_journal(tmp_path):
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.close()

    with pytest.raises(CorruptJournal, match="no events table"):
        verify_file(other)
    with pytest.raises(CorruptJournal, match="does not exist"):
        verify_file(tmp_path / "missing.db")


async def test_open_rejects_garbage_file(tmp_path):
    path = tmp_path / "journal.db"
    path.write_bytes(b"this is not sqlite" * 100)

    with pytest.raises(CorruptJournal, match="not a readable SQLite database"):
        await EventStore.open(path)


def test_chain_hash_matches_documented_encoding():
    data_json = canonical_json({"b": 1, "a": "\u00e9"})
    fields = [GENESIS_HASH, 1, 'job "1"\n', 1, "Ticked", 1, 1700000000.25]
    header = json.dumps(fields, separators=(",", ":"), ensure_ascii=True)
    expected = hashlib.sha256(f"{header}\n{data_json}".encode()).hexdigest()

    assert data_json == '{"a":"\\u00e9","b":1}'
    assert chain_hash(*fields[:6], data_json, fields[6]) == expected


@pytest.mark.parametrize(
    ("stream", "event_type", "recorded_at"),
    [('job "1"\n', "Ticked", 1700000000.25), ("j\u00f6b-\u4e2d", "T\u00e9", 0.1), ("x", "Y", 1e-7)],
)
def test_writer_hash_equals_chain_hash(stream, event_type, recorded_at):
    data_json = canonical_json({"n": 1})
    fast = hash_encoded_row("f" * 64, 7, json_string(stream), 3, json_string(event_type), 2,
                            json_time(recorded_at), data_json)
    assert fast == chain_hash("f" * 64, 7, stream, 3, event_type, 2, data_json, recorded_at)


async def test_stored_hashes_chain_from_genesis(tmp_path):
    path = tmp_path / "journal.db"
    await make_journal(path, count=2)
    conn = raw(path)
    rows = conn.execute(
        "SELECT seq, stream, version, type, schema_version, data, recorded_at, hash "
        "FROM events ORDER BY seq"
    ).fetchall()
    conn.close()

    previous = GENESIS_HASH
    for seq, stream, version, event_type, schema_version, data, recorded_at, row_hash in rows:
        assert row_hash == chain_hash(previous, seq, stream, version, event_type,
                                      schema_version, data, recorded_at)
        previous = row_hash
