"""Schema migrations keyed by PRAGMA user_version, and upcasting on read."""

from __future__ import annotations

import sqlite3

import pytest

from journal import EventStore, NewEvent, SchemaTooNew
from journal.schema import (
    LATEST_SCHEMA_VERSION,
    PAGE_SIZE,
    WAL_CHECKPOINT_PAGES,
    configure_writer,
    migrate,
)


def user_version(path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def index_names(path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
    finally:
        conn.close()
    return {name for (name,) in rows}


async def test_new_file_at_latest_version(tmp_path):
    path = tmp_path / "journal.db"
    async with await EventStore.open(path):
        pass
    assert user_version(path) == LATEST_SCHEMA_VERSION
    assert "events_by_type" in index_names(path)


def pragma(path, name: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        conn.close()


async def test_new_file_gets_small_pages(tmp_path):
    path = tmp_path / "journal.db"
    async with await EventStore.open(path) as store:
        await store.append("job-1", [NewEvent("JobSubmitted", {})], expected_version=0)
    assert pragma(path, "page_size") == PAGE_SIZE == 1024


def test_writer_checkpoints_late(tmp_path):
    conn = sqlite3.connect(tmp_path / "journal.db", isolation_level=None)
    try:
        configure_writer(conn, "FULL")
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WAL_CHECKPOINT_PAGES
    finally:
        conn.close()


async def test_existing_file_keeps_page_size(tmp_path):
    path = tmp_path / "journal.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA page_size=4096")
    conn.execute("PRAGMA journal_mode=WAL")
    migrate(conn, path)
    conn.close()

    async with await EventStore.open(path) as store:
        await store.append("job-1", [NewEvent("JobSubmitted", {})], expected_version=0)
        assert (await store.verify()).ok

    assert pragma(path, "page_size") == 4096


async def test_older_file_upgraded_on_open(tmp_path):
    path = tmp_path / "journal.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, path, target=1)
    conn.close()
    assert user_version(path) == 1
    assert "events_by_type" not in index_names(path)

    async with await EventStore.open(path) as store:
        await store.append("job-1", [NewEvent("JobSubmitted", {})], expected_version=0)
        assert (await store.verify()).ok

    assert user_version(path) == LATEST_SCHEMA_VERSION
    assert "events_by_type" in index_names(path)


async def test_events_survive_upgrade(tmp_path):
    path = tmp_path / "journal.db"
    async with await EventStore.open(path) as store:
        await store.append("job-1", [NewEvent("JobSubmitted", {"a": 1})], expected_version=0)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP INDEX events_by_type")
    conn.execute("DROP INDEX events_by_recorded_at")
    conn.execute("PRAGMA user_version = 1")
    conn.close()

    async with await EventStore.open(path) as store:
        assert [e.data for e in await store.read_stream("job-1")] == [{"a": 1}]
        assert (await store.verify()).ok
    assert user_version(path) == LATEST_SCHEMA_VERSION


async def test_newer_file_rejected(tmp_path):
    path = tmp_path / "journal.db"
    async with await EventStore.open(path):
        pass
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA user_version = {LATEST_SCHEMA_VERSION + 5}")
    conn.close()

    with pytest.raises(SchemaTooNew) as caught:
        await EventStore.open(path)
    message = str(caught.value)
    assert f"schema version {LATEST_SCHEMA_VERSION + 5}" in message
    assert f"up to {LATEST_SCHEMA_VERSION}" in message
    assert "newer release" in message
    assert user_version(path) == LATEST_SCHEMA_VERSION + 5


def add_gpu_count(data: dict) -> dict:
    return {**data, "num_gpus": 1}


def rename_price(data: dict) -> dict:
    data = dict(data)
    data["dph"] = data.pop("price")
    return data


async def test_upcasters_applied_on_read(tmp_path):
    path = tmp_path / "journal.db"
    async with await EventStore.open(path) as store:
        await store.append("job-1", [NewEvent("OfferSelected", {"price": 0.5})],
                           expected_version=0)

    upcasters = {("OfferSelected", 1): add_gpu_count, ("OfferSelected", 2): rename_price}
    async with await EventStore.open(path, upcasters=upcasters) as store:
        (event,) = await store.read_stream("job-1")
        (same,) = await store.read_all()
        assert (await store.verify()).ok

    assert event.schema_version == 3
    assert event.data == {"dph": 0.5, "num_gpus": 1}
    assert same == event
    conn = sqlite3.connect(path)
    stored = conn.execute("SELECT schema_version, data FROM events").fetchone()
    conn.close()
    assert stored == (1, '{"price":0.5}')


async def test_upcaster_skips_current_version(tmp_path):
    upcasters = {("OfferSelected", 1): add_gpu_count}
    async with await EventStore.open(tmp_path / "journal.db", upcasters=upcasters) as store:
        await store.append("job-1", [NewEvent("OfferSelected", {"num_gpus": 4}, schema_version=2)],
                           expected_version=0)
        (event,) = await store.read_stream("job-1")
    assert event.schema_version == 2
    assert event.data == {"num_gpus": 4}
