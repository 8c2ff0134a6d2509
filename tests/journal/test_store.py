"""EventStore appends and reads against a real SQLite file."""

from __future__ import annotations

import pytest

from journal import (
    EventStore,
    InvalidAppend,
    NewEvent,
    RecordedEvent,
    StoreClosed,
    VersionConflict,
)


@pytest.fixture
async def store(tmp_path):
    store = await EventStore.open(tmp_path / "journal.db")
    yield store
    await store.close()


def submitted(n: int) -> NewEvent:
    return NewEvent("JobSubmitted", {"n": n})


async def test_append_to_new_stream(store):
    recorded = await store.append("job-1", [submitted(1), submitted(2)], expected_version=0)

    assert [e.seq for e in recorded] == [1, 2]
    assert [e.version for e in recorded] == [1, 2]
    assert all(isinstance(e, RecordedEvent) for e in recorded)
    assert recorded[0].data == {"n": 1}
    assert recorded[0].stream == "job-1"
    assert len(recorded[1].hash) == 64
    assert recorded[0].hash != recorded[1].hash


async def test_read_stream_returns_stored_events(store):
    appended = await store.append("job-1", [submitted(1), submitted(2)], expected_version=0)
    await store.append("job-2", [submitted(3)], expected_version=0)

    assert await store.read_stream("job-1") == appended
    assert await store.read_stream("job-1", from_version=2) == appended[1:]
    assert await store.read_stream("missing") == []


async def test_versions_and_last_seq(store):
    assert await store.stream_version("job-1") == 0
    assert await store.last_seq() == 0

    await store.append("job-1", [submitted(1)], expected_version=0)
    await store.append("job-1", [submitted(2), submitted(3)], expected_version=1)

    assert await store.stream_version("job-1") == 3
    assert await store.last_seq() == 3


async def test_version_conflict_writes_nothing(store):
    await store.append("job-1", [submitted(1)], expected_version=0)

    with pytest.raises(VersionConflict) as caught:
        await store.append("job-1", [submitted(2)], expected_version=0)

    assert caught.value.stream == "job-1"
    assert caught.value.expected == 0
    assert caught.value.actual == 1
    assert "job-1" in str(caught.value)
    assert await store.last_seq() == 1


async def test_expected_version_ahead_conflicts(store):
    with pytest.raises(VersionConflict) as caught:
        await store.append("job-1", [submitted(1)], expected_version=3)
    assert caught.value.actual == 0


@pytest.mark.parametrize(
    ("stream", "events", "expected_version", "message"),
    [
        ("job-1", [], 0, "no events"),
        ("", [submitted(1)], 0, "stream"),
        ("job-1", [submitted(1)], -1, "expected_version"),
        ("job-1", [NewEvent("", {})], 0, "event type"),
        ("job-1", [NewEvent("JobSubmitted", {"x": object()})], 0, "not JSON"),
        ("job-1", [NewEvent("JobSubmitted", {"x": float("nan")})], 0, "not JSON"),
        ("job-1", [NewEvent("JobSubmitted", {}, schema_version=0)], 0, "schema_version"),
        ("job-1", [{"type": "JobSubmitted"}], 0, "NewEvent"),
    ],
)
async def test_invalid_append_rejected(store, stream, events, expected_version, message):
    with pytest.raises(InvalidAppend, match=message):
        await store.append(stream, events, expected_version=expected_version)
    assert await store.last_seq() == 0


async def test_read_all_from_seq_and_limit(store):
    for i in range(5):
        await store.append(f"job-{i}", [submitted(i)], expected_version=0)

    assert [e.seq for e in await store.read_all()] == [1, 2, 3, 4, 5]
    assert [e.seq for e in await store.read_all(from_seq=3)] == [3, 4, 5]
    assert [e.seq for e in await store.read_all(from_seq=2, limit=2)] == [2, 3]
    assert await store.read_all(from_seq=6) == []


async def test_iter_all_crosses_batches(store):
    for i in range(25):
        await store.append("job-1", [submitted(i)], expected_version=i)

    seqs = [e.seq async for e in store.iter_all(batch_size=4)]
    assert seqs == list(range(1, 26))
    tail = [e.data["n"] async for e in store.iter_all(from_seq=21, batch_size=4)]
    assert tail == [20, 21, 22, 23, 24]


async def test_data_round_trips_as_json(store):
    data = {"b": [1, 2.5, None, True], "a": {"nested": "é \n \"quoted\""}}
    await store.append("job-1", [NewEvent("JobSubmitted", data)], expected_version=0)

    (event,) = await store.read_stream("job-1")
    assert event.data == data
    assert isinstance(event.recorded_at, float)


async def test_reopen_keeps_events(tmp_path):
    path = tmp_path / "journal.db"
    async with await EventStore.open(path) as store:
        await store.append("job-1", [submitted(1)], expected_version=0)

    async with await EventStore.open(path) as store:
        assert await store.stream_version("job-1") == 1
        recorded = await store.append("job-1", [submitted(2)], expected_version=1)
        assert recorded[0].seq == 2
        assert (await store.verify()).ok


async def test_closed_store_rejects_calls(tmp_path):
    store = await EventStore.open(tmp_path / "journal.db")
    await store.close()

    with pytest.raises(StoreClosed):
        await store.append("job-1", [submitted(1)], expected_version=0)
    with pytest.raises(StoreClosed):
        await store.read_all()


async def test_query_returns_rows_by_name(store):
    await store.append("job-1", [submitted(1)], expected_version=0)

    rows = await store.query("SELECT stream, version FROM events WHERE seq = ?", (1,))
    assert rows[0]["stream"] == "job-1"
    assert rows[0]["version"] == 1


async def test_synchronous_setting_validated(tmp_path):
    with pytest.raises(ValueError, match="synchronous"):
        await EventStore.open(tmp_path / "journal.db", synchronous="OFF")
