"""Reports through the artifact store, for workers that cannot reach the supervisor.

Each worker overwrites one mailbox object with its latest report; the supervisor reads the
mailboxes of jobs with a live instance once per tick. Reports are whole snapshots, so a report
overwritten before it was read loses nothing but a transition's exact moment.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from gpujobs.states import JobState
from gpujobs.supervisor.reporting import handle_report
from worker.protocol import MAILBOX_KEY, InvalidReport, Report
from worker.storage import ObjectNotFound, StorageError, open_storage

if TYPE_CHECKING:
    from gpujobs.supervisor.core import Supervisor

log = logging.getLogger(__name__)
POLLED_STATES = (JobState.PROVISIONING, JobState.RUNNING, JobState.CHECKPOINTING,
                 JobState.RESUMED, JobState.PREEMPTED)


async def poll_mailboxes(sup: Supervisor) -> int:
    """Feed every new mailbox report to the report handler; returns how many were new."""
    fresh = 0
    for job_id, job in list(sup.table.jobs.items()):
        if JobState(job["state"]) not in POLLED_STATES or not sup.table.live_attempts(job_id):
            continue
        report = await _read(sup, job_id)
        runtime = sup.table.runtime_for(job_id)
        if report is None or report.sent_at <= runtime.mailbox_sent_at:
            continue
        runtime.mailbox_sent_at = report.sent_at
        fresh += 1
        await handle_report(sup, report)
    return fresh


async def _read(sup: Supervisor, job_id: str) -> Report | None:
    storage = open_storage(sup.artifact_uri(job_id))
    try:
        data = await storage.get_bytes(MAILBOX_KEY)
    except ObjectNotFound:
        return None
    except StorageError as exc:
        log.warning("job %s: cannot read the report mailbox: %s", job_id, exc)
        return None
    finally:
        await storage.close()
    try:
        report = Report.from_json(data)
    except InvalidReport as exc:
        log.warning("job %s: the report mailbox holds an invalid report: %s", job_id, exc)
        return None
    if report.job_id != job_id:
        log.warning("job %s: the mailbox holds a report for job %s; ignored", job_id,
                    report.job_id)
        return None
    return report
