"""Periodic bills are spread over ticks: those billed longest ago first, a share per tick."""

from __future__ import annotations

import time
from types import SimpleNamespace

from journal import EventStore

from gpujobs import events as ev
from gpujobs.projections import JobsProjection, label_for
from gpujobs.settings import Settings
from gpujobs.supervisor.jobsteps import jobs_to_step, periodic_bills_per_tick
from gpujobs.supervisor.reconcile import InstanceView
from gpujobs.supervisor.state import JobTable


async def running_jobs(store: EventStore, billed_from: dict[str, float]) -> JobTable:
    for job_id, start in billed_from.items():
        label = label_for(job_id, 1)
        await store.append(job_id, [e.to_new_event() for e in (
            ev.JobSubmitted(job_id=job_id, name="digits", team="ml", project="p",
                            profile_name="dev-test", profile={}, spec={"total_steps": 600}),
            ev.OfferSelected(attempt=1, offer_id=7, machine_id=3, host_id=2, gpu_name="RTX 4090",
                             num_gpus=1, dph_total=0.2, reliability=0.99, bid_price=None),
            ev.InstanceRequested(1, 7, label),
            ev.InstanceCreated(1, 100, label, 0.2, billed_from=start),
            ev.WorkerStarted(1, 0),
        )], expected_version=0)
    table = JobTable(store)
    await table.catch_up()
    # Each instance was listed and billed at the GPU rate before.
    for job_id in billed_from:
        table.runtime_for(job_id).attempt(1).rate_class = "gpu"
    return table


async def test_periodic_bills_oldest_first(tmp_path):
    now = time.time()
    # Twelve jobs were last billed 100 to 210 s ago, in an order unrelated to the job order.
    # One was billed 10 s ago, inside the 60 s interval.
    billed_from = {f"job-{i:02d}": now - 100 - (i * 7 % 12) * 10 for i in range(12)}
    billed_from["job-recent"] = now - 10
    settings = Settings(home=tmp_path, tick_s=5.0, cost_interval_s=60.0, periodic_bills_per_s=1.0)
    async with await EventStore.open(tmp_path / "journal.db",
                                     projections=[JobsProjection()]) as store:
        table = await running_jobs(store, billed_from)
    sup = SimpleNamespace(table=table, settings=settings)
    ordered = list(billed_from)
    view = InstanceView(listed_at=now)
    assert periodic_bills_per_tick(sup) == 5

    due = jobs_to_step(sup, ordered, view, now)
    oldest = sorted(billed_from, key=billed_from.get)[:5]
    assert due == [job_id for job_id in ordered if job_id in oldest]

    # A job due for another reason (its worker went silent) is stepped beyond the share.
    table.runtime_for("job-recent").last_report_at = now - settings.heartbeat_timeout_s - 1
    due = jobs_to_step(sup, ordered, view, now)
    assert due == [job_id for job_id in ordered if job_id in oldest or job_id == "job-recent"]

    # Without a share to spare, every job due for a bill is stepped.
    sup.settings = settings.replace(periodic_bills_per_s=100.0)
    due = jobs_to_step(sup, ordered, view, now)
    assert due == ordered
