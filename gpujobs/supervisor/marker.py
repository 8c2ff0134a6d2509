"""Validation of the completion marker that a worker stores once its job is done.

The marker decides that a job never runs again, so the supervisor reads it before every
recovery and every create. It comes from storage that workers write, so it is checked here
before any of it reaches the journal.
"""

from __future__ import annotations

import logging
import math

from worker.protocol import CompletionMarker

log = logging.getLogger(__name__)

MAX_STEP = 2**53  # the largest step that JSON readers and SQLite keep exactly


class InvalidMarker(ValueError):
    """The completion marker cannot be trusted: it does not parse or names another job."""


def checked_marker(job_id: str, text: str | bytes) -> CompletionMarker:
    """Parse and check a marker; raise InvalidMarker naming the problem.

    Metrics that are not finite numbers (a diverged loss, say) are dropped with a warning,
    because the journal stores strict JSON.
    """
    try:
        marker = CompletionMarker.from_json(text)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise InvalidMarker(f"it does not parse ({exc})") from exc
    if marker.job_id != job_id:
        raise InvalidMarker(f"it names job {marker.job_id!r}")
    if not 0 <= marker.step <= MAX_STEP:
        raise InvalidMarker(f"its step {marker.step} is outside 0..{MAX_STEP}")
    finite = {name: value for name, value in marker.metrics.items() if math.isfinite(value)}
    if len(finite) != len(marker.metrics):
        dropped = sorted(set(marker.metrics) - set(finite))
        log.warning("job %s: dropping metrics that are not finite from its completion "
                    "marker: %s", job_id, ", ".join(dropped))
        marker = CompletionMarker(marker.job_id, marker.attempt, marker.step,
                                  marker.completed_at, finite)
    return marker
