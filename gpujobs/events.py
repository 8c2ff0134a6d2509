"""Job events: facts in the past tense, one frozen dataclass per type, each with a schema version.

A job's stream is its id. Every event that concerns one instance carries the attempt number,
so a reader can tell the history of each rented machine apart. The supervisor's own stream
(`SUPERVISOR_STREAM`) records destroys of instances that no live attempt owns.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

from journal import NewEvent, RecordedEvent

# Not a job id: every job id ends in "-" and six hex digits.
SUPERVISOR_STREAM = "supervisor"


@dataclass(frozen=True)
class JobEvent:
    SCHEMA_VERSION: ClassVar[int] = 1

    @classmethod
    def type_name(cls) -> str:
        return cls.__name__

    def to_new_event(self) -> NewEvent:
        """Return the event as the journal stores it, with dict and list fields copied."""
        data = {}
        for name in _field_names(type(self)):
            value = getattr(self, name)
            data[name] = copy.deepcopy(value) if isinstance(value, (dict, list)) else value
        return NewEvent(type=self.type_name(), data=data, schema_version=self.SCHEMA_VERSION)


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    # Not dataclasses.asdict, which deep-copies every field: events are mostly flat scalars,
    # and the supervisor builds thousands of them per billing round.
    return tuple(field.name for field in dataclasses.fields(cls))


@dataclass(frozen=True)
class JobSubmitted(JobEvent):
    job_id: str
    name: str
    team: str
    project: str
    profile_name: str
    profile: dict[str, Any]  # the profile as it was at submission, so later edits change nothing
    spec: dict[str, Any]  # what to run: command, image, total_steps, checkpoint_every, env keys
    priority: int = 0
    submitted_by: str = ""


@dataclass(frozen=True)
class OfferSelected(JobEvent):
    attempt: int
    offer_id: int
    machine_id: int | None
    host_id: int | None
    gpu_name: str
    num_gpus: int
    dph_total: float
    reliability: float | None
    bid_price: float | None  # None for on-demand
    rank_reason: str = ""


@dataclass(frozen=True)
class InstanceRequested(JobEvent):
    attempt: int
    offer_id: int
    label: str


@dataclass(frozen=True)
class InstanceCreated(JobEvent):
    attempt: int
    instance_id: int
    label: str
    dph_total: float
    adopted: bool = False  # found by label after a crash, not from the create call's response
    # When the create call was sent, after its intent was durable. The API starts billing
    # during the call, so billing from here counts the call but not the intent's commit.
    # None (adopted, or journaled before this field) bills from the intent.
    billed_from: float | None = None


@dataclass(frozen=True)
class InstanceCreateFailed(JobEvent):
    attempt: int
    offer_id: int
    error_kind: str
    message: str


@dataclass(frozen=True)
class ProvisioningFailed(JobEvent):
    attempt: int
    reason: str
    retry_after_s: float = 0.0


@dataclass(frozen=True)
class RecoveryDeferred(JobEvent):
    attempt: int
    reason: str


@dataclass(frozen=True)
class WorkerStarted(JobEvent):
    attempt: int
    step: int


@dataclass(frozen=True)
class JobResumed(JobEvent):
    attempt: int
    from_step: int
    checkpoint_uri: str | None


@dataclass(frozen=True)
class ProgressReported(JobEvent):
    attempt: int
    step: int


@dataclass(frozen=True)
class CheckpointStarted(JobEvent):
    attempt: int
    step: int


@dataclass(frozen=True)
class CheckpointSaved(JobEvent):
    attempt: int
    step: int
    uri: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class PreemptionDetected(JobEvent):
    attempt: int
    instance_id: int | None
    reason: str  # outbid, offline, exited, gone, heartbeat_lost, sigterm
    step: int  # the last step the worker reported
    last_checkpoint_step: int | None


@dataclass(frozen=True)
class InstanceDestroyRequested(JobEvent):
    attempt: int
    instance_id: int
    reason: str


@dataclass(frozen=True)
class InstanceDestroyed(JobEvent):
    attempt: int
    instance_id: int


@dataclass(frozen=True)
class InstanceDestroyFailed(JobEvent):
    attempt: int
    instance_id: int
    message: str
    retry_in_s: float


@dataclass(frozen=True)
class StrayDestroyRequested(JobEvent):
    """A DELETE is about to go out for an instance with our label but no live attempt.

    Recorded on the supervisor's stream, without an `attempt` field, because the label may name
    an attempt, or a job, that this journal never recorded.
    """

    instance_id: int
    label: str
    reason: str


@dataclass(frozen=True)
class StrayDestroyed(JobEvent):
    """The API no longer lists a stray instance (supervisor's stream)."""

    instance_id: int
    label: str


@dataclass(frozen=True)
class StrayDestroyFailed(JobEvent):
    """A DELETE of a stray instance failed; it is retried after `retry_in_s`."""

    instance_id: int
    label: str
    message: str
    retry_in_s: float


@dataclass(frozen=True)
class CostAccrued(JobEvent):
    attempt: int
    instance_id: int
    amount_usd: float
    billed_s: float
    dph_total: float
    through: float  # unix time up to which this attempt is now billed
    rate_class: str | None = None  # "gpu" or "storage": what it bills at from `through` on
    # Set only on the event that settles a destroyed instance: the provider's whole charge for
    # it. `amount_usd` is then that charge less what the journal had billed, and `billed_s` is 0.
    settled_usd: float | None = None


@dataclass(frozen=True)
class WorkerStalled(JobEvent):
    attempt: int
    step: int
    stalled_s: float


@dataclass(frozen=True)
class WorkerUnreachable(JobEvent):
    attempt: int
    silent_s: float


@dataclass(frozen=True)
class WorkerAbandoned(JobEvent):
    """A worker stayed silent past the heartbeat timeout and the grace while its instance ran.

    Its attempt is given up, and a PreemptionDetected follows in the same append.
    """

    attempt: int
    silent_s: float


@dataclass(frozen=True)
class JobCompleted(JobEvent):
    attempt: int
    step: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class JobFailed(JobEvent):
    reason: str
    attempt: int = 0


@dataclass(frozen=True)
class CancelRequested(JobEvent):
    requested_by: str = ""


@dataclass(frozen=True)
class BudgetAlert(JobEvent):
    """Spend in a budget scope crossed an alert threshold (recorded on the job that crossed it)."""

    scope: str
    threshold: float
    spent_usd: float
    limit_usd: float


@dataclass(frozen=True)
class StopRequested(JobEvent):
    """The supervisor asked the worker to checkpoint and stop; the job then fails with reason."""

    reason: str
    attempt: int = 0


@dataclass(frozen=True)
class JobCancelled(JobEvent):
    reason: str = "cancelled by user"
    attempt: int = 0


EVENT_TYPES: dict[str, type[JobEvent]] = {
    cls.__name__: cls
    for cls in (
        JobSubmitted, OfferSelected, InstanceRequested, InstanceCreated, InstanceCreateFailed,
        ProvisioningFailed, RecoveryDeferred, WorkerStarted, JobResumed, ProgressReported,
        CheckpointStarted, CheckpointSaved, PreemptionDetected, InstanceDestroyRequested,
        InstanceDestroyed, InstanceDestroyFailed, CostAccrued, WorkerStalled, WorkerUnreachable,
        WorkerAbandoned,
        JobCompleted, JobFailed, CancelRequested, StopRequested, BudgetAlert, JobCancelled,
        StrayDestroyRequested, StrayDestroyed, StrayDestroyFailed,
    )
}


def decode(event: RecordedEvent) -> JobEvent:
    """Build the typed event from a journal row; raises ValueError naming the row if it is not one."""
    cls = EVENT_TYPES.get(event.type)
    if cls is None:
        raise ValueError(f"journal row {event.seq} has unknown event type {event.type!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in event.data.items() if k in names})
    except TypeError as exc:
        raise ValueError(f"journal row {event.seq} ({event.type}) is malformed: {exc}") from exc
