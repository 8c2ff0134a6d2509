"""The supervisor's job table folds its own appends without a read, and others' with one."""

from __future__ import annotations

import asyncio
import gc

from journal import EventStore

from gpujobs import events as ev
from gpujobs.budgets import BudgetConfig
from gpujobs.projections import JobsProjection, label_for
from gpujobs.supervisor.budget_guard import BudgetGuard
from gpujobs.supervisor.state import JobTable


def submitted(job_id: str) -> ev.JobSubmitted:
    return ev.JobSubmitted(job_id=job_id, name="digits", team="ml", project="p",
                           profile_name="dev-test", profile={"max_dph": 0.25},
                           spec={"total_steps": 600})


async def append(store: EventStore, job_id: str, events: list[ev.JobEvent], version: int):
    return await store.append(job_id, [e.to_new_event() for e in events],
                              expected_version=version)


async def test_fold_appended_matches_a_fresh_read(tmp_path):
    async with await EventStore.open(tmp_path / "journal.db",
                                     projections=[JobsProjection()]) as store:
        table = JobTable(store)
        own = await append(store, "job-1", [submitted("job-1")], 0)
        await table.fold_appended(own)
        assert table.seq == 1
        assert table.jobs["job-1"]["state"] == "queued"

        # Another writer's append lands between two of ours: the table reads it too.
        await append(store, "job-2", [submitted("job-2")], 0)
        own = await append(store, "job-1", [
            ev.OfferSelected(attempt=1, offer_id=7, machine_id=3, host_id=2, gpu_name="RTX 4090",
                             num_gpus=1, dph_total=0.2, reliability=0.99, bid_price=None),
            ev.InstanceRequested(attempt=1, offer_id=7, label=label_for("job-1", 1)),
        ], 1)
        await table.fold_appended(own)
        assert table.seq == 4
        assert set(table.jobs) == {"job-1", "job-2"}

        # Events folded already (by a catch-up in between) are not folded twice.
        own = await append(store, "job-1", [ev.InstanceCreated(
            attempt=1, instance_id=11, label=label_for("job-1", 1), dph_total=0.2)], 3)
        await table.catch_up()
        await table.fold_appended(own)

        fresh = JobTable(store)
        await fresh.catch_up()
        assert table.seq == fresh.seq == 5
        assert table.jobs == fresh.jobs
        for job_id in ("job-1", "job-2"):
            assert table.spec(job_id) == fresh.spec(job_id)
            assert table.profile(job_id) == fresh.profile(job_id)
            assert table.metrics(job_id) == fresh.metrics(job_id)
        assert table.attempts == fresh.attempts
        assert table.live == fresh.live == {("job-1", 1): fresh.attempts["job-1"][1]}
        assert table.jobs["job-1"]["version"] == 4


async def test_billing_starts_at_create_call(tmp_path):
    # A created attempt bills from the moment its create call went out; an adopted one, whose
    # call time is unknown, from its intent. The budget guard starts both bills at the same
    # moments as the job table.
    async with await EventStore.open(tmp_path / "journal.db",
                                     projections=[JobsProjection()]) as store:
        for job_id, created in (
            ("job-1", ev.InstanceCreated(1, 11, label_for("job-1", 1), 0.2, billed_from=1.5)),
            ("job-2", ev.InstanceCreated(1, 12, label_for("job-2", 1), 0.2, adopted=True)),
        ):
            await append(store, job_id, [submitted(job_id)], 0)
            await append(store, job_id, [ev.InstanceRequested(1, 7, label_for(job_id, 1))], 1)
            await append(store, job_id, [created], 2)
        table = JobTable(store)
        await table.catch_up()
        guard = BudgetGuard(BudgetConfig(), (), None)
        requested_at = {}
        for event in await store.read_all():
            guard.fold(event.seq, event.stream, event.type, event.data, event.recorded_at)
            if event.type == "InstanceRequested":
                requested_at[event.stream] = event.recorded_at
    assert table.attempts["job-1"][1]["billed_through"] == 1.5
    assert table.attempts["job-2"][1]["billed_through"] == requested_at["job-2"]
    assert guard.billed_through == {("job-1", 1): 1.5, ("job-2", 1): requested_at["job-2"]}


async def test_settings_kept_beside_untracked_rows(tmp_path):
    async with await EventStore.open(tmp_path / "journal.db",
                                     projections=[JobsProjection()]) as store:
        for job_id in ("job-1", "job-2", "job-3"):
            await append(store, job_id, [submitted(job_id)], 0)
        await append(store, "job-1", [ev.CancelRequested("no longer needed")], 1)
        await append(store, "job-3", [ev.JobCompleted(0, 600, {"accuracy": 0.9})], 1)
        table = JobTable(store)
        await table.catch_up()
        loaded = JobTable(store)
        await loaded.load()  # from the projection, as a supervisor starts: without job-3
        assert "job-3" not in loaded.jobs
        assert await loaded.ensure_loaded("job-3")  # rebuilt from its events

        for rows in (table, loaded):
            for job_id in ("job-1", "job-2", "job-3"):
                row = rows.jobs[job_id]
                assert not {"spec", "profile", "metrics"} & set(row)
                assert not gc.is_tracked(row)
                assert rows.spec(job_id) == {"total_steps": 600}
                assert rows.profile(job_id) == {"max_dph": 0.25}
            assert rows.metrics("job-2") == {}
            assert rows.metrics("job-3") == {"accuracy": 0.9}
            assert rows.jobs["job-3"]["state"] == "done"
            assert rows.spec("job-1") is rows.spec("job-2")  # equal dicts are stored once


async def created_attempt(store: EventStore) -> None:
    """Journal job-1 with attempt 1 created."""
    await append(store, "job-1", [submitted("job-1")], 0)
    await append(store, "job-1", [ev.InstanceRequested(1, 7, label_for("job-1", 1)),
                                  ev.InstanceCreated(1, 11, label_for("job-1", 1), 0.2)], 1)


def record_reads(monkeypatch, store: EventStore, table: JobTable) -> list[tuple]:
    """Record, after each read_stream of the store, the table's attempt and live entries."""
    seen: list[tuple] = []
    read_stream = store.read_stream

    async def recording_read(stream: str, **kwargs):
        events = await read_stream(stream, **kwargs)
        seen.append((stream in table.jobs, dict(table.attempts.get(stream, {})),
                     dict(table.live)))
        return events

    monkeypatch.setattr(store, "read_stream", recording_read)
    return seen


async def test_concurrent_loads_read_once(tmp_path, monkeypatch):
    async with await EventStore.open(tmp_path / "journal.db",
                                     projections=[JobsProjection()]) as store:
        await created_attempt(store)
        table = JobTable(store)
        table.seq = await store.last_seq()  # as after a start that did not load job-1
        seen_during_reads = record_reads(monkeypatch, store, table)
        loaded = await asyncio.gather(table.ensure_loaded("job-1"), table.ensure_loaded("job-1"))

    assert loaded == [True, True]
    assert seen_during_reads == [(False, {}, {})]  # the second call found the job loaded
    assert table.attempts["job-1"][1]["status"] == "created"
    assert list(table.live) == [("job-1", 1)]


async def test_reload_keeps_attempts_during_read(tmp_path, monkeypatch):
    async with await EventStore.open(tmp_path / "journal.db",
                                     projections=[JobsProjection()]) as store:
        await created_attempt(store)
        table = JobTable(store)
        await table.catch_up()
        del table.jobs["job-1"]  # its attempt rows stay, as for a job loaded for them alone
        seen_during_read = record_reads(monkeypatch, store, table)
        assert await table.ensure_loaded("job-1")

    ((_, attempts, live),) = seen_during_read
    assert attempts[1]["status"] == "created"
    assert list(live) == [("job-1", 1)]
    assert table.attempts["job-1"][1]["status"] == "created"
