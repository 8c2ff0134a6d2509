"""Validation of the completion marker that a worker stores once its job is done.

The marker decides that a job never runs again, so the supervisor reads it before every
recovery and every create. It comes from storage that workers write, so it is checked before
any of it reaches the journal. `CompletionMarker.from_json` already bounds the step to
0..2**53 and drops metrics that are not finite; this module adds the check of the job id.
"""

from __future__ import annotations

from worker.protocol import CompletionMarker, InvalidCompletionMarker


class InvalidMarker(ValueError):
    """The completion marker cannot be trusted: it does not parse or names another job."""


def checked_marker(job_id: str, text: str | bytes) -> CompletionMarker:
    """Parse a marker and check that it belongs to `job_id`; raise InvalidMarker otherwise."""
    try:
        marker = CompletionMarker.from_json(text)
    except InvalidCompletionMarker as exc:
        raise InvalidMarker(f"it does not parse ({exc})") from exc
    if marker.job_id != job_id:
        raise InvalidMarker(f"it names job {marker.job_id!r}")
    return marker
