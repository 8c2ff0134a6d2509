"""Errors of the orchestrator. Every message names what is wrong and what to do about it.

GpujobsError
├── ConfigError          a config file or job spec is missing or invalid
├── UnknownProfile       a job names a profile that no config file defines
├── IllegalTransition    an event does not apply to the job's current state
├── JobNotFound          no job with that id in the journal
├── SupervisorRunning    another supervisor holds this journal's lease
├── LeaseLost            this supervisor's lease was taken over (gpujobs.supervisor.lease)
└── BudgetExceeded       a job's worst case does not fit what is left of a budget
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpujobs.states import JobState


class GpujobsError(Exception):
    """Root of the orchestrator's errors; the CLI prints the message on one line."""


class ConfigError(GpujobsError):
    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 key: str | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(f"{where}{message}")
        self.path = path
        self.line = line
        self.key = key


class UnknownProfile(GpujobsError):
    def __init__(self, name: str, known: list[str]) -> None:
        choices = ", ".join(sorted(known)) or "none"
        super().__init__(
            f"unknown GPU profile {name!r}; choose one of: {choices} "
            "(run `gpujobs profiles` to list them)"
        )
        self.name = name


class IllegalTransition(GpujobsError):
    def __init__(self, job_id: str, state: JobState, event_type: str) -> None:
        super().__init__(
            f"job {job_id}: event {event_type} is not allowed in state {state.value}"
        )
        self.job_id = job_id
        self.state = state
        self.event_type = event_type


class JobNotFound(GpujobsError):
    def __init__(self, job_id: str, journal_path: str) -> None:
        super().__init__(
            f"no job {job_id!r} in the journal {journal_path}; "
            "run `gpujobs status` to list jobs, or check GPUJOBS_HOME"
        )
        self.job_id = job_id


class SupervisorRunning(GpujobsError):
    def __init__(self, holder: str, journal_path: str, expires_in_s: float) -> None:
        super().__init__(
            f"another supervisor ({holder}) holds the lease on {journal_path}; "
            f"stop it first, or wait {expires_in_s:.0f} s for its lease to expire if it died"
        )
        self.holder = holder


class BudgetExceeded(GpujobsError):
    def __init__(self, scope: str, needed_usd: float, left_usd: float) -> None:
        super().__init__(
            f"budget {scope} has ${left_usd:.2f} left but the job may cost up to "
            f"${needed_usd:.2f}; raise the limit in budgets.yaml or lower max_duration_hours"
        )
        self.scope = scope
        self.needed_usd = needed_usd
        self.left_usd = left_usd
