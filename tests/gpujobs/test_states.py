"""The job state machine: the table, legal paths, and errors for every illegal event."""

from __future__ import annotations

import pytest

from gpujobs.errors import IllegalTransition
from gpujobs.states import (
    NON_TERMINAL_STATES, TERMINAL_STATES, TRANSITION_EVENTS, TRANSITIONS, JobMachine, JobState,
    next_state,
)

MAIN_PATH = ["OfferSelected", "WorkerStarted", "CheckpointStarted", "CheckpointSaved",
             "JobCompleted"]
RECOVERY_PATH = ["OfferSelected", "WorkerStarted", "CheckpointStarted", "CheckpointSaved",
                 "PreemptionDetected", "OfferSelected", "JobResumed", "ProgressReported",
                 "JobCompleted"]


def allowed(state: JobState, event: str) -> bool:
    return any(t.event == event and state in t.sources for t in TRANSITIONS)


def test_all_nine_states_exist() -> None:
    assert {s.value for s in JobState} == {
        "queued", "provisioning", "running", "checkpointing", "preempted", "resumed", "done",
        "failed", "cancelled",
    }


def test_main_path_reaches_done() -> None:
    machine = JobMachine("job-1")
    visited = [machine.state]
    for event in MAIN_PATH:
        visited.append(machine.apply(event).value)
    assert visited == ["queued", "provisioning", "running", "checkpointing", "running", "done"]


def test_recovery_path_visits_preempted_and_resumed() -> None:
    machine = JobMachine("job-2")
    visited = [machine.apply(event).value for event in RECOVERY_PATH]
    assert visited[4] == "preempted"
    assert visited[6] == "resumed"
    assert visited[-1] == "done"


@pytest.mark.parametrize("state", list(JobState))
def test_illegal_events_raise_with_context(state: JobState) -> None:
    for event in sorted(TRANSITION_EVENTS):
        if allowed(state, event) or event == "CheckpointSaved":
            continue
        machine = JobMachine("job-x", state)
        with pytest.raises(IllegalTransition) as caught:
            machine.apply(event)
        message = str(caught.value)
        assert "job-x" in message
        assert state.value in message
        assert event in message
        assert machine.job_state is state  # the failed event changed nothing


def test_terminal_states_accept_no_transition() -> None:
    for state in TERMINAL_STATES:
        for event in TRANSITION_EVENTS - {"CheckpointSaved"}:
            with pytest.raises(IllegalTransition):
                next_state("job-t", state, event)


def test_every_live_state_can_fail_or_be_cancelled() -> None:
    for state in NON_TERMINAL_STATES:
        assert next_state("j", state, "JobFailed") is JobState.FAILED
        assert next_state("j", state, "JobCancelled") is JobState.CANCELLED


def test_unknown_event_type_raises() -> None:
    with pytest.raises(IllegalTransition, match="NoSuchEvent"):
        JobMachine("job-u").apply("NoSuchEvent")


def test_fast_table_matches_machine() -> None:
    for state in JobState:
        for event in TRANSITION_EVENTS:
            machine = JobMachine("j", state)
            try:
                expected = machine.apply(event)
            except IllegalTransition:
                with pytest.raises(IllegalTransition):
                    next_state("j", state, event)
                continue
            assert next_state("j", state, event) is expected


def test_checkpoint_saved_outside_checkpointing_keeps_state() -> None:
    for state in (JobState.RUNNING, JobState.PREEMPTED, JobState.RESUMED):
        assert JobMachine("j", state).apply("CheckpointSaved") is state
