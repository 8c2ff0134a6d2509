"""Cost, budgets and max duration against the emulator's billing, with real worker processes.

The emulator bills one hour per real second (time_scale 3600), so a few seconds of running
cost dollars. The supervisor is the production one: it checks admission before each
provisioning and enforces budgets at the end of each tick.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from gpujobs import jobs
from gpujobs.cost import IDLE, LOST, PROVISIONING, USEFUL, JobCost
from gpujobs.cost_report import load_job_costs, reconcile, report_rows
from gpujobs.emulator import Emulator
from gpujobs.emulator.faults import FaultPlan
from gpujobs.jobspec import JobSpec
from gpujobs.settings import Settings, load_settings
from gpujobs.states import JobState
from gpujobs.supervisor import budget_guard
from gpujobs.supervisor.core import Supervisor
from gpujobs.vast.client import VastClient

pytestmark = pytest.mark.timeout(150)

SCALE = 3600.0  # billed seconds per real second
TICK_S = 0.2
PREEMPTED_HEARTBEAT_S = 0.1
NO_PACING = {name: 0.0 for name in (
    "PUT /asks/{id}/", "GET /instances/{id}/", "PUT /instances/{id}/", "DELETE /instances/{id}/",
    "PUT /instances/bid_price/{id}/", "GET /api/v1/instances/", "GET /charges/",
)}
PROFILES = """\
profiles:
  e2e:
    gpu_name: RTX_4090
    num_gpus: 1
    max_dph: 0.25
    reliability_min: 0.9
    max_duration_hours: 20
  short:
    gpu_name: RTX_4090
    num_gpus: 1
    max_dph: 0.25
    reliability_min: 0.9
    max_duration_hours: 4
  spot:
    gpu_name: RTX_4090
    num_gpus: 1
    max_dph: 2.0
    reliability_min: 0.9
    max_duration_hours: 20
    interruptible: true
    on_preemption: wait
    resume_wait_s: 2
    disk_gb: 2000
"""
BUDGETS = """\
budgets:
  - team: lab
    limit_usd: 6.00
    period: day
    alert_at: [0.25]
on_exceeded: wait
"""


class Stack:
    def __init__(self, settings: Settings, emulator: Emulator, client: VastClient,
                 supervisor: Supervisor) -> None:
        self.settings = settings
        self.emulator = emulator
        self.client = client
        self.supervisor = supervisor
        self.loop: asyncio.Task[None] | None = None

    def start_loop(self) -> None:
        self.loop = asyncio.get_running_loop().create_task(self.supervisor.run())

    async def submit(self, **changes: Any) -> str:
        values: dict[str, Any] = {
            "name": "digits", "profile": "e2e", "team": "lab", "project": "digits",
            "total_steps": 400, "checkpoint_every": 50, "step_delay_s": 0.01,
            "heartbeat_interval_s": 0.25, "grace_period_s": 2.0,
        }
        values.update(changes)
        return await jobs.submit(self.settings, JobSpec(**values), store=self.supervisor.store)

    def job(self, job_id: str) -> dict[str, Any]:
        """The job's row, or an empty one until the supervisor has folded its submission."""
        return self.supervisor.table.jobs.get(job_id) or {
            "state": None, "instance_id": None, "last_checkpoint_step": None, "attempt": 0,
        }

    async def wait_for(self, predicate: Callable[[], bool], what: str,
                       timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if self.loop is not None and self.loop.done():
                self.loop.result()
                raise AssertionError("the supervisor loop stopped")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
            await asyncio.sleep(0.05)

    async def settled(self, job_id: str) -> dict[str, Any]:
        def done() -> bool:
            job = self.supervisor.table.jobs.get(job_id)
            return (job is not None and JobState(job["state"]).is_terminal
                    and not self.supervisor.table.live_attempts(job_id))

        await self.wait_for(done, f"job {job_id} to end")
        return self.job(job_id)

    async def costs(self) -> dict[str, JobCost]:
        return {c.job_id: c for c in await load_job_costs(self.supervisor.store)}

    async def events(self, job_id: str) -> list[Any]:
        return await self.supervisor.store.read_stream(job_id)

    def ledger(self) -> dict[int, dict[str, Any]]:
        return {row["id"]: row for row in self.emulator.ledger()}


@asynccontextmanager
async def live_stack(tmp_path: Path, budgets: str = BUDGETS, start: bool = True,
                     **changes: Any) -> AsyncIterator[Stack]:
    """Run an emulator and a supervisor; with start=False the caller starts the loop."""
    config = tmp_path / "config"
    config.mkdir()
    (config / "gpu_profiles.yaml").write_text(PROFILES)
    (config / "budgets.yaml").write_text(budgets)
    home = tmp_path / "home"
    settings = load_settings(home=home).replace(
        config_dirs=(config,), tick_s=TICK_S, cost_interval_s=1.0, heartbeat_timeout_s=15.0,
        unreachable_grace_s=15.0, **changes,
    )
    emulator = Emulator(seed=11, loading_s=0.3, workdir=home / "emulator", time_scale=SCALE,
                        rate_limits=False)
    url = await emulator.start()
    client = VastClient(api_key=emulator.api_key, base_url=url, min_interval_s=NO_PACING)
    supervisor = Supervisor(settings, client, billing_time_scale=SCALE,
                                   intent_timeout_s=5.0)
    await supervisor.start()
    stack = Stack(settings, emulator, client, supervisor)
    if start:
        stack.start_loop()
    try:
        yield stack
    finally:
        supervisor.request_stop()
        if stack.loop is not None:
            await asyncio.gather(stack.loop, return_exceptions=True)
        await supervisor.stop()
        await client.close()
        await emulator.stop()


def usd(dph: float, real_s: float) -> float:
    return dph * real_s * SCALE / 3600.0


def first_time(events: list[Any], kind: str, attempt: int, **match: Any) -> float:
    for event in events:
        if event.type == kind and event.data.get("attempt") == attempt and all(
            event.data.get(k) == v for k, v in match.items()
        ):
            return event.recorded_at
    raise AssertionError(f"no {kind} for attempt {attempt} with {match}")


def billed_until(stack: Stack, at: float) -> float:
    """What the emulator billed all instances up to real time `at`, each at its dph_total."""
    total = 0.0
    for row in stack.ledger().values():
        end = at if row["destroyed_at"] is None else min(at, row["destroyed_at"])
        total += usd(row["dph_total"], max(0.0, end - row["created_at"]))
    return total


def assert_stop_split(cost: JobCost, events: list[Any]) -> None:
    """Check a stopped job's split: useful until the checkpoint after the stop, then idle."""
    (attempt,) = cost.attempts
    dph = attempt.dph_total
    created = first_time(events, "InstanceCreated", 1)
    started = first_time(events, "WorkerStarted", 1)
    stop_at = next(e.recorded_at for e in events if e.type == "StopRequested")
    run_end = min(e.recorded_at for e in events if e.recorded_at >= stop_at
                  and e.type in ("CheckpointSaved", "InstanceDestroyRequested"))
    destroyed = first_time(events, "InstanceDestroyed", 1)
    assert attempt.by_category[PROVISIONING] == pytest.approx(usd(dph, started - created),
                                                              rel=0.02)
    assert attempt.by_category[USEFUL] == pytest.approx(usd(dph, run_end - started), rel=0.02)
    assert attempt.by_category[LOST] == 0.0
    assert attempt.by_category[IDLE] <= usd(dph, destroyed - run_end) * 1.01
    assert sum(attempt.by_category.values()) == pytest.approx(attempt.cost_usd)


def assert_matches_ledger(stack: Stack, cost: JobCost, tolerance: float = 0.01) -> None:
    ledger = stack.ledger()
    for attempt in cost.attempts:
        billed = ledger[attempt.instance_id]
        assert billed["status"] == "destroyed"
        assert attempt.cost_usd == pytest.approx(billed["cost_usd"], rel=tolerance), (
            f"attempt {attempt.attempt} instance {attempt.instance_id}"
        )


async def test_preemption_cost_and_lost_work(tmp_path: Path) -> None:
    async with live_stack(tmp_path) as stack:
        job_id = await stack.submit(total_steps=600, checkpoint_every=150,
                                    heartbeat_interval_s=PREEMPTED_HEARTBEAT_S)

        def checkpointed() -> bool:
            job = stack.job(job_id)
            return (job["state"] in ("running", "checkpointing") and job["instance_id"]
                    is not None and (job["last_checkpoint_step"] or 0) >= 150)

        await stack.wait_for(checkpointed, "a durable checkpoint at step 150")
        await asyncio.sleep(0.8)  # run on past the checkpoint, so that work is lost
        instance_id = int(stack.job(job_id)["instance_id"])
        killed_at = time.time()
        await stack.emulator.preempt(instance_id, sigterm=False, grace_s=0.0)
        job = await stack.settled(job_id)
        assert job["state"] == "done"
        assert job["attempt"] == 2
        events = await stack.events(job_id)
        cost = (await stack.costs())[job_id]
        first, second = cost.attempts
        dph = first.dph_total

        # The journal's cost per instance is the emulator's bill. The moment the preempted
        # instance stopped is estimated between its worker's last report and the next one due,
        # so it may be off by half a heartbeat interval, plus the report's delivery time.
        ledger = stack.ledger()
        stop_error_s = PREEMPTED_HEARTBEAT_S / 2 + 0.05
        stopped_slack = usd(dph, stop_error_s) / ledger[first.instance_id]["cost_usd"]
        assert first.cost_usd == pytest.approx(ledger[first.instance_id]["cost_usd"],
                                               rel=0.01 + stopped_slack)
        assert second.cost_usd == pytest.approx(ledger[second.instance_id]["cost_usd"], rel=0.01)
        assert cost.cost_usd == pytest.approx(stack.emulator.total_charges_usd(), rel=0.01)

        # Lost work: from reaching the durable step until the loss was seen.
        resumed = next(e for e in events if e.type == "JobResumed")
        durable_step = resumed.data["from_step"]
        reached_at = first_time(events, "CheckpointStarted", 1, step=durable_step)
        assert killed_at - reached_at >= 0.8
        assert first.by_category[LOST] >= usd(dph, killed_at - reached_at - stop_error_s) * 0.99
        assert first.by_category[LOST] <= usd(dph, killed_at - reached_at + stop_error_s)
        assert second.by_category[LOST] == 0.0

        # Provisioning: from the instance's creation until its worker reported.
        for attempt, started in ((first, "WorkerStarted"), (second, "JobResumed")):
            expected = usd(attempt.dph_total, first_time(events, started, attempt.attempt)
                           - first_time(events, "InstanceCreated", attempt.attempt))
            assert attempt.by_category[PROVISIONING] == pytest.approx(expected, rel=0.02)
        assert first.by_category[IDLE] > 0.0
        assert second.by_category[USEFUL] > 0.0
        for attempt in (first, second):
            assert sum(attempt.by_category.values()) == pytest.approx(attempt.cost_usd)

        rows = report_rows((await stack.costs()).values(), "job")
        assert rows[0].cost_usd == pytest.approx(cost.cost_usd)
        assert rows[0].lost_usd == pytest.approx(first.by_category[LOST])


async def test_stopped_instance_storage_cost(tmp_path: Path) -> None:
    # A large disk makes storage a visible part of the bill while the outbid instance waits
    # stopped for its host (resume_wait_s) before the job migrates.
    async with live_stack(tmp_path) as stack:
        job_id = await stack.submit(profile="spot", team="other", total_steps=400,
                                    checkpoint_every=50,
                                    heartbeat_interval_s=PREEMPTED_HEARTBEAT_S)
        await stack.wait_for(lambda: (stack.job(job_id)["last_checkpoint_step"] or 0) >= 50,
                             "the first checkpoint")
        instance_id = int(stack.job(job_id)["instance_id"])
        emulated = stack.emulator.fleet.instances[instance_id]
        await stack.emulator.preempt(instance_id, sigterm=False, grace_s=0.0)
        job = await stack.settled(job_id)
        assert job["state"] == "done"
        assert job["attempt"] == 2

        cost = (await stack.costs())[job_id]
        first = cost.attempts[0]
        assert first.instance_id == instance_id
        assert_matches_ledger(stack, cost)
        events = await stack.events(job_id)
        billed = [e.data for e in events if e.type == "CostAccrued" and e.data["attempt"] == 1
                  and e.data["billed_s"] > 0]
        storage = [d for d in billed
                   if d["dph_total"] == pytest.approx(emulated.disk_dph, rel=1e-4)]
        running = [d for d in billed
                   if d["dph_total"] == pytest.approx(emulated.dph_total, rel=1e-4)]
        assert storage, "no CostAccrued at the storage rate for the stopped instance"
        assert len(storage) + len(running) == len(billed)
        # Without the storage charge the attempt's cost would miss the 1% match above.
        assert sum(d["amount_usd"] for d in storage) > 0.05 * first.cost_usd
        assert sum(first.by_category.values()) == pytest.approx(first.cost_usd)


async def test_cancel_cost_matches_charges(tmp_path: Path) -> None:
    async with live_stack(tmp_path) as stack:
        job_id = await stack.submit(total_steps=100_000)
        await stack.wait_for(lambda: (stack.job(job_id)["last_checkpoint_step"] or 0) >= 50,
                             "the first checkpoint")
        await asyncio.sleep(0.5)
        state = await jobs.cancel(stack.settings, job_id)
        assert state in (JobState.RUNNING, JobState.CHECKPOINTING)
        job = await stack.settled(job_id)
        assert job["state"] == "cancelled"
        events = await stack.events(job_id)
        cost = (await stack.costs())[job_id]
        assert_matches_ledger(stack, cost)
        (attempt,) = cost.attempts
        assert attempt.by_category[LOST] == 0.0
        assert attempt.by_category[USEFUL] > attempt.by_category[IDLE]
        cancelled_at = first_time(events, "JobCancelled", 1)
        destroyed_at = first_time(events, "InstanceDestroyed", 1)
        assert attempt.by_category[IDLE] <= usd(attempt.dph_total,
                                                destroyed_at - cancelled_at) * 1.01

        checked = await reconcile(list((await stack.costs()).values()), stack.client)
        assert [row.instance_id for row in checked] == [attempt.instance_id]
        assert checked[0].matches, checked[0]
        assert checked[0].charged_usd == pytest.approx(attempt.cost_usd, rel=0.01)


async def test_budget_stops_jobs_and_holds_new_ones(tmp_path: Path) -> None:
    limit_usd = 6.0
    roomy = BUDGETS.replace("limit_usd: 6.00", "limit_usd: 12.00")
    async with live_stack(tmp_path, roomy) as stack:
        first = await stack.submit(total_steps=100_000)
        second = await stack.submit(total_steps=100_000)
        await stack.wait_for(lambda: all(stack.job(j)["state"] == "running"
                                         for j in (first, second)), "both jobs running")
        # The team lowers its budget below what the two running jobs may cost together.
        (tmp_path / "config" / "budgets.yaml").write_text(BUDGETS)
        ends = [await stack.settled(first), await stack.settled(second)]
        for job in ends:
            assert job["state"] == "failed"
            assert job["reason"].startswith("budget team=lab/day=")
            assert " is used up: $" in job["reason"]
            assert f" spent of ${limit_usd:.2f}, and stopping may cost $" in job["reason"]

        # By the emulator's bill: the overshoot is at most one tick of both instances'
        # billing, and the stop came when the bill plus the stop's own cost reached the limit.
        ledger = stack.ledger()
        spent = stack.emulator.total_charges_usd()
        assert spent == pytest.approx(billed_until(stack, float("inf")), rel=0.01)
        burn_dph = sum(row["dph_total"] for row in ledger.values())
        one_tick_usd = usd(burn_dph, TICK_S)
        assert spent <= limit_usd + one_tick_usd
        events = {job_id: await stack.events(job_id) for job_id in (first, second)}
        stop_at = min(e.recorded_at for job_id in events for e in events[job_id]
                      if e.type == "StopRequested")
        at_stop = billed_until(stack, stop_at)
        stop_lead_s = 2.0 + budget_guard.STOP_MARGIN_S + 2 * TICK_S  # grace_period_s 2.0
        assert at_stop < limit_usd
        assert at_stop + usd(burn_dph, stop_lead_s) >= limit_usd - one_tick_usd

        costs = await stack.costs()
        for job_id in (first, second):
            assert_matches_ledger(stack, costs[job_id])
            assert_stop_split(costs[job_id], events[job_id])

        # The stop asked the workers to checkpoint before the instances went.
        for job_id in (first, second):
            types = [e.type for e in events[job_id]]
            assert "StopRequested" in types
            assert types.index("StopRequested") < types.index("InstanceDestroyRequested")
        alerts = [e for job_id in (first, second) for e in events[job_id]
                  if e.type == "BudgetAlert"]
        assert len(alerts) == 1
        assert alerts[0].data["threshold"] == 0.25
        assert alerts[0].data["limit_usd"] == limit_usd

        # A new job's worst case ($0.25/h x 20 h) no longer fits: it waits in queued.
        third = await stack.submit()
        runtime = stack.supervisor.table.runtime_for(third)
        await stack.wait_for(lambda: runtime.wait_reason is not None, "the admission check")
        assert runtime.wait_reason.startswith("budget team=lab/day=")
        assert runtime.wait_reason.endswith("but the job may cost up to $5.00 "
                                            "(max_dph $0.25/h x 20 h)")
        await asyncio.sleep(3 * TICK_S)
        assert stack.job(third)["state"] == "queued"
        assert stack.job(third)["attempt"] == 0


async def test_admission_reserves_worst_cases(tmp_path: Path) -> None:
    # $6.00 fits one worst case ($0.25/h x 20 h = $5.00) but not two. All three jobs are
    # queued before the first tick, so they are checked in the same tick.
    async with live_stack(tmp_path, start=False) as stack:
        job_ids = [await stack.submit(total_steps=100_000) for _ in range(3)]
        stack.start_loop()
        await stack.wait_for(lambda: any(stack.job(j)["state"] == "running" for j in job_ids),
                             "one job running")
        await asyncio.sleep(3 * TICK_S)
        running = [j for j in job_ids if stack.job(j)["attempt"] > 0]
        assert len(running) == 1
        assert len(stack.ledger()) == 1
        for job_id in job_ids:
            if job_id in running:
                continue
            assert stack.job(job_id)["state"] == "queued"
            reason = stack.supervisor.table.runtime_for(job_id).wait_reason
            assert reason is not None
            assert reason.startswith("budget team=lab/day=")
            assert " reserved for admitted jobs, but the job may cost up to $5.00 " in reason
        for job_id in job_ids:
            await jobs.cancel(stack.settings, job_id)
        for job_id in job_ids:
            assert (await stack.settled(job_id))["state"] == "cancelled"
        assert len(stack.ledger()) == 1


async def test_max_duration_stops_the_job(tmp_path: Path) -> None:
    async with live_stack(tmp_path) as stack:
        job_id = await stack.submit(profile="short", team="other", total_steps=100_000)
        job = await stack.settled(job_id)
        assert job["state"] == "failed"
        assert job["reason"].startswith("max_duration_hours reached: ran ")
        assert job["reason"].endswith(" h of 4 h")
        events = await stack.events(job_id)
        started = first_time(events, "WorkerStarted", 1)
        stop = next(e for e in events if e.type == "StopRequested")
        ran_h = (stop.recorded_at - started) * SCALE / 3600.0
        assert 4.0 <= ran_h <= 4.0 + 2 * TICK_S * SCALE / 3600.0
        cost = (await stack.costs())[job_id]
        assert_matches_ledger(stack, cost)
        assert_stop_split(cost, events)


async def test_reject_fails_job_that_cannot_fit(tmp_path: Path) -> None:
    budgets = BUDGETS.replace("limit_usd: 6.00", "limit_usd: 3.00").replace(
        "on_exceeded: wait", "on_exceeded: reject")
    async with live_stack(tmp_path, budgets) as stack:
        job_id = await stack.submit()
        job = await stack.settled(job_id)
        assert job["state"] == "failed"
        assert job["reason"].startswith("rejected: budget team=lab/day=")
        assert job["reason"].endswith("has $3.00 of $3.00 left, but the job may cost up to "
                                      "$5.00 (max_dph $0.25/h x 20 h)")
        assert job["attempt"] == 0
        assert stack.emulator.ledger() == []


async def test_destroyed_instances_settle_to_charges(tmp_path: Path) -> None:
    async with live_stack(tmp_path, settle_delay_s=0.0, settle_interval_s=0.2) as stack:
        # The first two charges queries fail: settling waits for a later one.
        stack.emulator.set_faults(FaultPlan.from_data([
            {"kind": "burst_5xx", "endpoint": "GET /charges/", "count": 2},
        ]))
        job_id = await stack.submit(total_steps=400, checkpoint_every=100)

        def checkpointed() -> bool:
            job = stack.job(job_id)
            return job["instance_id"] is not None and (job["last_checkpoint_step"] or 0) >= 100

        await stack.wait_for(checkpointed, "a durable checkpoint at step 100")
        await stack.emulator.preempt(int(stack.job(job_id)["instance_id"]), sigterm=False,
                                     grace_s=0.0)
        job = await stack.settled(job_id)
        assert job["state"] == "done"

        def both_settled() -> bool:
            settlement = stack.supervisor.settlement
            return not settlement.pending and settlement.settled == 2

        await stack.wait_for(both_settled, "both instances settled against the charges")
        # The client retries a 503 by itself, so the two failures may cost one query or two.
        assert stack.emulator.request_count("GET /charges/") >= 3
        events = await stack.events(job_id)
        settling = [e for e in events if e.type == "CostAccrued" and "settled_usd" in e.data
                    and e.data["settled_usd"] is not None]
        assert len(settling) == 2
        assert all(e.data["billed_s"] == 0.0 for e in settling)
        cost = (await stack.costs())[job_id]
        ledger = stack.ledger()
        for attempt in cost.attempts:
            billed = ledger[attempt.instance_id]["cost_usd"]
            assert attempt.cost_usd == pytest.approx(billed, abs=2e-6)
            assert sum(attempt.by_category.values()) == pytest.approx(attempt.cost_usd)
        assert cost.cost_usd == pytest.approx(stack.emulator.total_charges_usd(), abs=4e-6)
        # The projection folds the settling events too.
        assert stack.job(job_id)["cost_usd"] == pytest.approx(cost.cost_usd)


async def test_restarted_supervisor_settles_earlier_destroys(tmp_path: Path) -> None:
    async with live_stack(tmp_path, settle_delay_s=3600.0) as stack:
        job_id = await stack.submit(total_steps=200, checkpoint_every=100)
        assert (await stack.settled(job_id))["state"] == "done"
        assert len(stack.supervisor.settlement.pending) == 1
        settings, client = stack.settings, stack.client
        stack.supervisor.request_stop()
        await asyncio.gather(stack.loop, return_exceptions=True)
        await stack.supervisor.stop()

        # A new supervisor finds the unsettled instance in the journal and settles it.
        restarted = Supervisor(settings.replace(settle_delay_s=0.0, settle_interval_s=0.0),
                               client, billing_time_scale=SCALE)
        await restarted.start()
        try:
            assert len(restarted.settlement.pending) == 1
            await restarted.tick()
            assert restarted.settlement.settled == 1
            assert not restarted.settlement.pending
            cost = {c.job_id: c for c in await load_job_costs(restarted.store)}[job_id]
        finally:
            await restarted.stop()
        instance_id = cost.attempts[0].instance_id
        assert cost.cost_usd == pytest.approx(stack.ledger()[instance_id]["cost_usd"], abs=2e-6)
