"""Group commit: many concurrent appends share one transaction, and fail one by one."""

from __future__ import annotations

import asyncio
import gc
import json

import pytest

from journal import EventStore, NewEvent, ProjectionFailed, VersionConflict
from journal.writer import AppendRequest, encode_request
from journal_testkit import (
    BatchStreamCounter, FailingOn, StreamCounter, fold_counts, read_counts,
)


async def test_hundred_tasks_share_transaction(tmp_path):
    path = tmp_path / "journal.db"
    async with await EventStore.open(path, projections=[StreamCounter()]) as store:
        results = await asyncio.gather(*(
            store.append(f"job-{i}", [NewEvent("JobSubmitted", {"i": i})], expected_version=0)
            for i in range(100)
        ))

        assert store.stats.transactions == 1
        assert store.stats.appends == 100
        assert sorted(r[0].seq for r in results) == list(range(1, 101))
        assert (await store.verify()).ok
    assert read_counts(str(path)) == {f"job-{i}": (1, 1) for i in range(100)}


async def test_conflict_in_batch_fails_alone(tmp_path):
    async with await EventStore.open(tmp_path / "journal.db") as store:
        await store.append("shared", [NewEvent("JobSubmitted", {})], expected_version=0)

        appends = [
            store.append(f"job-{i}", [NewEvent("JobSubmitted", {"i": i})], expected_version=0)
            for i in range(50)
        ]
        appends.insert(25, store.append("shared", [NewEvent("JobCancelled", {})],
                                        expected_version=0))
        results = await asyncio.gather(*appends, return_exceptions=True)

        conflict = results.pop(25)
        assert isinstance(conflict, VersionConflict)
        assert (conflict.expected, conflict.actual) == (0, 1)
        assert all(isinstance(r, list) for r in results)
        assert await store.stream_version("shared") == 1
        assert await store.last_seq() == 51


async def test_same_stream_twice_in_batch(tmp_path):
    async with await EventStore.open(tmp_path / "journal.db") as store:
        first, second, third = await asyncio.gather(
            store.append("job-1", [NewEvent("A", {})], expected_version=0),
            store.append("job-1", [NewEvent("B", {})], expected_version=1),
            store.append("job-1", [NewEvent("C", {})], expected_version=1),
            return_exceptions=True,
        )

        assert first[0].version == 1
        assert second[0].version == 2
        assert isinstance(third, VersionConflict)
        assert third.actual == 2


@pytest.mark.parametrize("projections, failing", [
    (lambda: [StreamCounter(), FailingOn("Poisoned")], "failing_on"),
    (lambda: [BatchStreamCounter("Poisoned")], "batch_stream_counter"),  # through apply_many
], ids=["apply", "apply_many"])
async def test_projection_failure_fails_alone(tmp_path, projections, failing):
    path = tmp_path / "journal.db"
    async with await EventStore.open(path, projections=projections()) as store:
        appends = [
            store.append(f"job-{i}", [NewEvent("JobSubmitted", {})], expected_version=0)
            for i in range(10)
        ]
        appends.insert(5, store.append("bad", [NewEvent("JobSubmitted", {}),
                                               NewEvent("Poisoned", {})], expected_version=0))
        results = await asyncio.gather(*appends, return_exceptions=True)

        failure = results.pop(5)
        assert isinstance(failure, ProjectionFailed)
        assert failure.projection == failing
        assert isinstance(failure.__cause__, RuntimeError)
        assert all(isinstance(r, list) for r in results)
        assert await store.stream_version("bad") == 0
        assert [e.seq for e in await store.read_all()] == list(range(1, 11))
        assert (await store.verify()).ok
        events = await store.read_all()
    assert read_counts(str(path)) == fold_counts(events)


async def test_projection_matches_rebuild(tmp_path):
    path = tmp_path / "journal.db"
    async with await EventStore.open(path, projections=[StreamCounter()]) as store:
        for round_number in range(3):
            await asyncio.gather(*(
                store.append(f"job-{i}", [NewEvent("Ticked", {})], expected_version=round_number)
                for i in range(20)
            ))
        live = read_counts(str(path))
        await store.rebuild_projections()
        rebuilt = read_counts(str(path))
        events = await store.read_all()

    assert live == rebuilt
    assert live == fold_counts(events)
    assert live["job-0"] == (3, 3)


async def test_apply_many_gets_each_transaction_once(tmp_path):
    path = tmp_path / "journal.db"
    projection = BatchStreamCounter()
    async with await EventStore.open(path, projections=[projection]) as store:
        for round_number in range(2):
            await asyncio.gather(*(
                store.append(f"job-{i}", [NewEvent("Ticked", {}), NewEvent("Ticked", {})],
                             expected_version=2 * round_number)
                for i in range(50)
            ))
        assert store.stats.transactions == len(projection.calls)
        assert [seq for call in projection.calls for seq in call] == list(range(1, 201))
        live = read_counts(str(path))
        events = await store.read_all()
        await store.rebuild_projections()
        assert read_counts(str(path)) == live
    assert live == fold_counts(events)
    assert live["job-7"] == (4, 4)


async def test_projection_table_named_events_rejected(tmp_path):
    class Bad(StreamCounter):
        tables = ("events",)

    with pytest.raises(Exception, match="other than 'events'"):
        await EventStore.open(tmp_path / "journal.db", projections=[Bad()])


async def test_close_commits_queued_appends(tmp_path):
    path = tmp_path / "journal.db"
    store = await EventStore.open(path)
    pending = [
        asyncio.ensure_future(
            store.append(f"job-{i}", [NewEvent("JobSubmitted", {})], expected_version=0)
        )
        for i in range(10)
    ]
    await asyncio.sleep(0)
    await store.close()

    assert all(task.done() and not task.exception() for task in pending)
    async with await EventStore.open(path) as reopened:
        assert await reopened.last_seq() == 10


async def test_writer_sees_other_connection_appends(tmp_path):
    """The writer's cached stream versions and tail are re-read after another store commits."""
    path = tmp_path / "journal.db"
    async with await EventStore.open(path) as first, await EventStore.open(path) as second:
        await first.append("job-1", [NewEvent("A", {})], expected_version=0)
        await second.append("job-1", [NewEvent("B", {})], expected_version=1)
        await second.append("job-2", [NewEvent("C", {})], expected_version=0)

        with pytest.raises(VersionConflict) as caught:
            await first.append("job-1", [NewEvent("D", {})], expected_version=1)
        assert caught.value.actual == 2
        recorded = await first.append("job-1", [NewEvent("D", {})], expected_version=2)
        assert (recorded[0].seq, recorded[0].version) == (4, 3)
        assert await first.stream_version("job-2") == 1
        assert (await first.verify()).ok


@pytest.mark.parametrize(
    "data",
    [
        {"b": 1, "a": "x", "c": None, "d": True, "e": 1.5, "f": -0.0},
        {"nested": {"z": 1, "a": [1, 2]}, "t": (1, 2)},
        {"k": 10**30, "u": "\u00e9"},
    ],
)
def test_encoded_data_equals_parsed_json(data):
    encoded = encode_request("job-1", [NewEvent("A", data)], 0).events[0]
    parsed = json.loads(encoded.data_json)
    assert encoded.data == parsed
    assert list(encoded.data) == list(parsed)


async def test_idle_writer_releases_finished_batch(tmp_path):
    def pending_pairs() -> list[tuple]:
        return [
            o for o in gc.get_objects()
            if type(o) is tuple and len(o) == 2 and type(o[0]) is AppendRequest
        ]

    async with await EventStore.open(tmp_path / "journal.db") as store:
        await store.append("job-1", [NewEvent("JobSubmitted", {"n": 1})], expected_version=0)
        gc.collect()  # pairs left in cycles by earlier tests; a frame's reference survives this

        assert pending_pairs() == []
