"""The job state machine: states, the transition table as data, and a checked machine.

The table is checked when this module is imported, so a typo in it fails every import
instead of one job at three in the morning.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from transitions import Machine, MachineError

from gpujobs.errors import IllegalTransition


class JobState(enum.StrEnum):
    QUEUED = "queued"  # submitted, or a recovery waits for capacity or budget
    PROVISIONING = "provisioning"  # an offer was chosen; the instance is being created and started
    RUNNING = "running"  # the worker reports progress
    CHECKPOINTING = "checkpointing"  # a checkpoint is being written; left once it is durable
    PREEMPTED = "preempted"  # the instance was lost: outbid, host offline, heartbeat lost, SIGTERM
    RESUMED = "resumed"  # a replacement worker restored the last durable checkpoint
    DONE = "done"  # the worker finished and its final artifacts are stored
    FAILED = "failed"  # unrecoverable: retries spent, bad image, corrupt state, budget stop
    CANCELLED = "cancelled"  # a user cancelled it

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})
# The same states as the strings job rows store, for checks on every job of every tick.
TERMINAL_VALUES = frozenset(state.value for state in TERMINAL_STATES)
NON_TERMINAL_STATES = tuple(s for s in JobState if s not in TERMINAL_STATES)

S = JobState


@dataclass(frozen=True)
class Transition:
    """One row of the table: the event type that moves a job from `sources` to `dest`."""

    event: str
    sources: tuple[JobState, ...]
    dest: JobState


TRANSITIONS: tuple[Transition, ...] = (
    Transition("OfferSelected", (S.QUEUED, S.PREEMPTED), S.PROVISIONING),
    Transition("ProvisioningFailed", (S.PROVISIONING,), S.QUEUED),
    Transition("RecoveryDeferred", (S.PREEMPTED,), S.QUEUED),
    Transition("WorkerStarted", (S.PROVISIONING,), S.RUNNING),
    # From preempted when the same host resumed the instance (a wait or rebid policy).
    Transition("JobResumed", (S.PROVISIONING, S.PREEMPTED), S.RESUMED),
    Transition("ProgressReported", (S.RESUMED,), S.RUNNING),
    Transition("CheckpointStarted", (S.RUNNING, S.RESUMED), S.CHECKPOINTING),
    Transition("CheckpointSaved", (S.CHECKPOINTING,), S.RUNNING),
    Transition(
        "PreemptionDetected",
        (S.PROVISIONING, S.RUNNING, S.CHECKPOINTING, S.RESUMED),
        S.PREEMPTED,
    ),
    # A completion marker found in storage ends a job from any live state: it never reruns.
    Transition("JobCompleted", NON_TERMINAL_STATES, S.DONE),
    Transition("JobFailed", NON_TERMINAL_STATES, S.FAILED),
    Transition("JobCancelled", NON_TERMINAL_STATES, S.CANCELLED),
)

# Events that belong to a job's history but never change its state.
NON_TRANSITION_EVENTS = frozenset(
    {
        "JobSubmitted",  # creates the stream; the machine starts in queued
        "InstanceRequested",
        "InstanceCreated",
        "InstanceCreateFailed",
        "InstanceDestroyRequested",
        "InstanceDestroyed",
        "InstanceDestroyFailed",
        "CostAccrued",
        "CancelRequested",
        "StopRequested",
        "WorkerStalled",
        "WorkerUnreachable",
        "WorkerAbandoned",
        "BudgetAlert",
        "CheckpointSaved",  # also recorded outside checkpointing, when the start was not seen
    }
)

TRANSITION_EVENTS = frozenset(t.event for t in TRANSITIONS)


def _check_table() -> None:
    """Raise at import if the table names unknown states or leaves a state unreachable."""
    reachable = {S.QUEUED}
    for transition in TRANSITIONS:
        if transition.dest not in JobState.__members__.values():
            raise ValueError(f"transition {transition.event} goes to an unknown state")
        if transition.dest is not S.QUEUED and transition.dest in transition.sources:
            raise ValueError(f"transition {transition.event} loops on {transition.dest}")
        for source in transition.sources:
            if source.is_terminal:
                raise ValueError(f"transition {transition.event} leaves terminal state {source}")
        reachable.add(transition.dest)
    missing = set(JobState) - reachable
    if missing:
        raise ValueError(f"states never entered by any transition: {sorted(missing)}")


_check_table()


class JobMachine:
    """A job's state, driven only through the table; illegal events raise IllegalTransition."""

    def __init__(self, job_id: str, state: JobState = S.QUEUED) -> None:
        self.job_id = job_id
        self.state = state.value
        self._machine = Machine(
            model=self,
            states=[s.value for s in JobState],
            initial=state.value,
            auto_transitions=False,
            send_event=False,
            model_attribute="state",
        )
        for transition in TRANSITIONS:
            self._machine.add_transition(
                trigger=transition.event,
                source=[s.value for s in transition.sources],
                dest=transition.dest.value,
            )

    @property
    def job_state(self) -> JobState:
        return JobState(self.state)

    def can_apply(self, event_type: str) -> bool:
        if event_type in self._machine.get_triggers(self.state):
            return True
        return event_type in NON_TRANSITION_EVENTS

    def apply(self, event_type: str) -> JobState:
        """Apply one event; returns the state after it."""
        if event_type not in TRANSITION_EVENTS or (
            event_type == "CheckpointSaved" and self.state != S.CHECKPOINTING
        ):
            if event_type in NON_TRANSITION_EVENTS:
                return self.job_state
            raise IllegalTransition(self.job_id, self.job_state, event_type)
        try:
            getattr(self, event_type)()
        except MachineError as exc:
            raise IllegalTransition(self.job_id, self.job_state, event_type) from exc
        return self.job_state


def next_state(job_id: str, state: JobState, event_type: str) -> JobState:
    """Return the state after `event_type`, without building a machine (for fast replay)."""
    dest = _FAST_TABLE.get((state, event_type))
    if dest is not None:
        return dest
    if event_type in NON_TRANSITION_EVENTS:
        return state
    raise IllegalTransition(job_id, state, event_type)


_FAST_TABLE: dict[tuple[JobState, str], JobState] = {
    (source, t.event): t.dest for t in TRANSITIONS for source in t.sources
}
