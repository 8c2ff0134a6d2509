"""Replay through the state machine reproduces the stored projections, for random histories.

Histories are random walks over the transition table in gpujobs.states: at each step one event
that is legal in the job's current state is drawn, with data shaped like the real event.
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from journal import EventStore, ProjectionFailed

from gpujobs import events as ev
from gpujobs.errors import IllegalTransition
from gpujobs.projections import LIVE_ATTEMPT_STATUSES, JobsProjection, label_for
from gpujobs.replay import check_projections, replay_events
from gpujobs.states import TERMINAL_STATES, TRANSITIONS, JobMachine, JobState, next_state
from gpujobs.supervisor.state import JobTable
from gpujobs.views import create_views

S = JobState
PREEMPTION_REASONS = ("outbid", "offline", "heartbeat_lost", "sigterm", "worker_error: exit 1")
# Events that change no state, and the states in which a real supervisor records them.
SIDE_EVENTS: dict[str, tuple[JobState, ...]] = {
    "InstanceRequested": (S.PROVISIONING,),
    "InstanceCreated": (S.PROVISIONING,),
    "InstanceCreateFailed": (S.PROVISIONING,),
    "CostAccrued": (S.RUNNING, S.CHECKPOINTING, S.PREEMPTED, S.RESUMED),
    "InstanceDestroyRequested": (S.PREEMPTED,),
    "InstanceDestroyed": (S.PREEMPTED,),
    "WorkerStalled": (S.RUNNING,),
    "WorkerUnreachable": (S.RUNNING, S.RESUMED),
    "CancelRequested": (S.QUEUED, S.PROVISIONING, S.RUNNING),
    "CheckpointSaved": (S.RUNNING,),  # a save whose start was not seen
}


class JobWalk:
    """One job's history so far: its state and the facts later events refer to."""

    def __init__(self, job_id: str, team: str) -> None:
        self.job_id = job_id
        self.team = team
        self.state = S.QUEUED
        self.attempt = 0
        self.step = 0
        self.instance_id: int | None = None
        self.checkpoint_step: int | None = None
        self.events: list[ev.JobEvent] = []

    def legal_types(self) -> list[str]:
        if self.state in TERMINAL_STATES:
            return []
        types = [t.event for t in TRANSITIONS if self.state in t.sources]
        if self.attempt <= 1:
            types = [t for t in types if t != "JobResumed"]  # nothing to resume from yet
        types += [t for t, states in SIDE_EVENTS.items() if self.state in states]
        if self.instance_id is None:
            types = [t for t in types if t not in ("CostAccrued", "InstanceDestroyRequested",
                                                   "InstanceDestroyed")]
        return sorted(set(types))

    def make(self, event_type: str, draw: Any) -> ev.JobEvent:
        """Build one event of `event_type` with plausible data, and advance the walk."""
        event = _FACTORIES[event_type](self, draw)
        self.state = next_state(self.job_id, self.state, event_type)
        self.events.append(event)
        return event


def _offer(walk: JobWalk, draw: Any) -> ev.OfferSelected:
    walk.attempt += 1
    walk.instance_id = None
    dph = draw(st.floats(0.05, 3.0))
    bid = draw(st.one_of(st.none(), st.floats(0.05, 3.0)))
    return ev.OfferSelected(walk.attempt, draw(st.integers(1, 10**7)), 22563, 152241,
                            draw(st.sampled_from(["RTX 4090", "A100", "H100"])), 1, dph, 0.95,
                            bid, "cheapest fitting offer")


def _created(walk: JobWalk, draw: Any) -> ev.InstanceCreated:
    walk.instance_id = 30_000_000 + walk.attempt
    return ev.InstanceCreated(walk.attempt, walk.instance_id, label_for(walk.job_id, walk.attempt),
                              draw(st.floats(0.05, 3.0)), draw(st.booleans()))


def _progress(walk: JobWalk, draw: Any) -> int:
    walk.step += draw(st.integers(0, 50))
    return walk.step


def _saved(walk: JobWalk, draw: Any) -> ev.CheckpointSaved:
    walk.checkpoint_step = walk.step
    uri = f"file:///artifacts/{walk.job_id}/step-{walk.step}/payload.pt"
    return ev.CheckpointSaved(walk.attempt, walk.step, uri, "ab" * 32, draw(st.integers(1, 10**6)))


def _preempted(walk: JobWalk, draw: Any) -> ev.PreemptionDetected:
    reason = draw(st.sampled_from(PREEMPTION_REASONS))
    return ev.PreemptionDetected(walk.attempt, walk.instance_id, reason, walk.step,
                                 walk.checkpoint_step)


def _destroyed(walk: JobWalk, draw: Any) -> ev.InstanceDestroyed:
    instance_id, walk.instance_id = walk.instance_id, None
    return ev.InstanceDestroyed(walk.attempt, instance_id)


def _resumed(walk: JobWalk, draw: Any) -> ev.JobResumed:
    walk.step = walk.checkpoint_step or 0
    return ev.JobResumed(walk.attempt, walk.step, None if walk.checkpoint_step is None else "uri")


def _cost(walk: JobWalk, draw: Any) -> ev.CostAccrued:
    billed_s = draw(st.floats(0.5, 3600.0))
    return ev.CostAccrued(walk.attempt, walk.instance_id, billed_s * 0.2 / 3600, billed_s, 0.2,
                          1796402612.0 + walk.step)


_FACTORIES = {
    "OfferSelected": _offer,
    "InstanceRequested": lambda w, d: ev.InstanceRequested(w.attempt, 7, label_for(w.job_id,
                                                                                   w.attempt)),
    "InstanceCreated": _created,
    "InstanceCreateFailed": lambda w, d: ev.InstanceCreateFailed(w.attempt, 7, "http_400",
                                                                 "offer taken"),
    "ProvisioningFailed": lambda w, d: ev.ProvisioningFailed(w.attempt, "no offer", 5.0),
    "RecoveryDeferred": lambda w, d: ev.RecoveryDeferred(w.attempt, "budget"),
    "WorkerStarted": lambda w, d: ev.WorkerStarted(w.attempt, _progress(w, d)),
    "JobResumed": _resumed,
    "ProgressReported": lambda w, d: ev.ProgressReported(w.attempt, _progress(w, d)),
    "CheckpointStarted": lambda w, d: ev.CheckpointStarted(w.attempt, _progress(w, d)),
    "CheckpointSaved": _saved,
    "PreemptionDetected": _preempted,
    "InstanceDestroyRequested": lambda w, d: ev.InstanceDestroyRequested(
        w.attempt, w.instance_id, "preempted"),
    "InstanceDestroyed": _destroyed,
    "CostAccrued": _cost,
    "WorkerStalled": lambda w, d: ev.WorkerStalled(w.attempt, w.step, 120.0),
    "WorkerUnreachable": lambda w, d: ev.WorkerUnreachable(w.attempt, 60.0),
    "CancelRequested": lambda w, d: ev.CancelRequested("alice"),
    "JobCompleted": lambda w, d: ev.JobCompleted(w.attempt, _progress(w, d), {"loss": 0.1}),
    "JobFailed": lambda w, d: ev.JobFailed("retries spent", w.attempt),
    "JobCancelled": lambda w, d: ev.JobCancelled("cancelled by user", w.attempt),
}


def submitted(job_id: str, team: str) -> ev.JobSubmitted:
    return ev.JobSubmitted(
        job_id=job_id, name="digits", team=team, project="p", profile_name="dev-test",
        profile={"name": "dev-test", "max_dph": 0.25, "gpu_names": ["RTX 4090"]},
        spec={"total_steps": 600, "checkpoint_every": 50}, priority=1, submitted_by="alice",
    )


def test_factories_cover_transition_table():
    table_events = {t.event for t in TRANSITIONS} | set(SIDE_EVENTS)
    assert table_events == set(_FACTORIES)


async def append_walks(path: Path, walks: list[JobWalk], plan: list[tuple[int, int]]) -> None:
    """Append every walk's events, in the interleaving `plan` gives: (walk, events per append)."""
    positions = [0] * len(walks)
    async with await EventStore.open(path, projections=[JobsProjection()]) as store:
        for walk in walks:
            await store.append(walk.job_id, [submitted(walk.job_id, walk.team).to_new_event()],
                               expected_version=0)
        for index, size in plan:
            walk, start = walks[index], positions[index]
            chunk = walk.events[start : start + size]
            if chunk:
                await store.append(walk.job_id, [e.to_new_event() for e in chunk],
                                   expected_version=start + 1)
                positions[index] += len(chunk)
        for index, walk in enumerate(walks):
            rest = walk.events[positions[index]:]
            if rest:
                await store.append(walk.job_id, [e.to_new_event() for e in rest],
                                   expected_version=positions[index] + 1)


async def check_replay(path: Path, walks: list[JobWalk]) -> None:
    async with await EventStore.open(path, projections=[JobsProjection()]) as store:
        count, differences = await check_projections(store)
        assert differences == []
        assert count == sum(len(w.events) + 1 for w in walks)
        for walk in walks:
            replay = replay_events(walk.job_id, await store.read_stream(walk.job_id))
            rows = await store.query("SELECT state, attempt FROM jobs WHERE job_id = ?",
                                     (walk.job_id,))
            assert replay.state == rows[0]["state"] == walk.state.value
            assert replay.attempts == rows[0]["attempt"] == walk.attempt
            await check_transitions_view(path, walk.job_id, replay.transitions)
        await check_live_index(store)


async def check_live_index(store: EventStore) -> None:
    """The supervisor's index of live attempts matches its rows, folded or loaded."""
    stored = {(row["job_id"], row["attempt"]) for row in await store.query(
        "SELECT job_id, attempt FROM attempts WHERE status IN (?, ?, ?)", LIVE_ATTEMPT_STATUSES)}
    folded = JobTable(store)
    await folded.catch_up()
    loaded = JobTable(store)
    await loaded.load()
    for table in (folded, loaded):
        expected = {(job_id, number): row for job_id, rows in table.attempts.items()
                    for number, row in rows.items() if row["status"] in LIVE_ATTEMPT_STATUSES}
        assert table.live == expected
        assert set(table.live) == stored


async def check_transitions_view(path: Path, job_id: str, transitions: list[dict]) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        create_views(conn)
        rows = conn.execute(
            "SELECT seq, event, from_state, to_state FROM job_transitions WHERE job_id = ? "
            "ORDER BY seq", (job_id,)
        ).fetchall()
    finally:
        conn.close()
    assert rows == [(t["seq"], t["event"], t["from"], t["to"]) for t in transitions]


def draw_event_type(walk: JobWalk, draw: Any) -> str:
    """Draw a legal event type; ending the job is rare, so that histories get long."""
    choices = walk.legal_types()
    ongoing = [t for t in choices if t not in ("JobCompleted", "JobFailed", "JobCancelled")]
    if ongoing and draw(st.integers(0, 24)) > 0:
        return draw(st.sampled_from(ongoing))
    return draw(st.sampled_from(choices))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_histories_replay_exactly(data):
    walks = [JobWalk(f"job-{i}", data.draw(st.sampled_from(["ml", "infra"])))
             for i in range(data.draw(st.integers(1, 6)))]
    for walk in walks:
        for _ in range(data.draw(st.integers(0, 60))):
            walk.make(draw_event_type(walk, data.draw), data.draw)
            if walk.state in TERMINAL_STATES:
                break
    plan = data.draw(st.lists(st.tuples(st.integers(0, len(walks) - 1), st.integers(1, 4)),
                              max_size=60))

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "journal.db"
        asyncio.run(append_walks(path, walks, plan))
        asyncio.run(check_replay(path, walks))


@pytest.mark.parametrize("apply", [
    lambda: next_state("job-1", S.QUEUED, "WorkerStarted"),
    lambda: JobMachine("job-1").apply("WorkerStarted"),
], ids=["table", "machine"])
def test_illegal_event_names_job_state_event(apply):
    with pytest.raises(IllegalTransition) as caught:
        apply()
    assert caught.value.job_id == "job-1"
    assert caught.value.state is S.QUEUED
    assert caught.value.event_type == "WorkerStarted"
    assert str(caught.value) == "job job-1: event WorkerStarted is not allowed in state queued"


async def test_illegal_append_rolled_back(tmp_path):
    path = tmp_path / "journal.db"
    async with await EventStore.open(path, projections=[JobsProjection()]) as store:
        await store.append("job-1", [submitted("job-1", "ml").to_new_event()], expected_version=0)
        illegal = ev.CheckpointStarted(1, 10).to_new_event()

        with pytest.raises(ProjectionFailed) as caught:
            await store.append("job-1", [illegal], expected_version=1)

        cause = caught.value.__cause__
        assert isinstance(cause, IllegalTransition)
        assert str(cause) == "job job-1: event CheckpointStarted is not allowed in state queued"
        assert await store.stream_version("job-1") == 1
        events = await store.read_stream("job-1")
    with pytest.raises(IllegalTransition, match="event CheckpointStarted is not allowed in"):
        replay_events("job-1", [*events, _recorded_like(events[0], illegal)])


def _recorded_like(first, new_event):
    """A RecordedEvent that would follow `first` in its stream, for replay-only checks."""
    from journal import RecordedEvent

    return RecordedEvent(first.seq + 1, first.stream, first.version + 1, new_event.type,
                         new_event.schema_version, new_event.data, first.recorded_at + 1, "0" * 64)
