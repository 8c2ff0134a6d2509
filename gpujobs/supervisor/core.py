"""The supervisor process: one asyncio loop that owns every side effect of one journal."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Sequence

from journal import EventStore, VersionConflict

from gpujobs import events as ev
from gpujobs.projections import JobsProjection
from gpujobs.settings import Settings
from gpujobs.limits import load_limits
from gpujobs.offers import load_failed_hosts
from gpujobs.supervisor import budget_guard, jobsteps, mailbox, queue, reconcile, reporting
from gpujobs.supervisor.settlement import Settlement
from gpujobs.supervisor.lease import SupervisorLease
from gpujobs.supervisor.marker import InvalidMarker, checked_marker
from gpujobs.supervisor.strays import StrayDestroyer
from gpujobs.supervisor.reports import ReportServer, TokenIssuer
from gpujobs.supervisor.state import JobTable
from gpujobs.vast.client import VastClient
from worker.protocol import COMPLETION_MARKER, CompletionMarker
from worker.storage import open_storage

log = logging.getLogger(__name__)

OUTCOME_APPEND_TRIES = 5


def freeze_startup_objects() -> int:
    """Exempt every object alive now from later garbage collections; return how many.

    The supervise command calls this once, after start: the imported modules and the jobs
    loaded from the journal then stay out of every full collection, which at 10,000 jobs would
    otherwise walk them each time. Frozen objects are still freed by reference counting; only a
    reference cycle among them is never collected.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class Supervisor:
    def __init__(self, settings: Settings, client: VastClient, *,
                 billing_time_scale: float = 1.0, intent_timeout_s: float = 60.0,
                 destroy_resend_s: float = 60.0) -> None:
        self.settings = settings
        self.client = client
        self.billing_time_scale = billing_time_scale  # only the emulator bills faster than a clock
        self.intent_timeout_s = intent_timeout_s
        # An accepted DELETE whose instance is still listed this long after is sent again.
        self.destroy_resend_s = destroy_resend_s
        self.tokens = TokenIssuer.from_home(settings.home)
        self.lease = SupervisorLease(settings.journal_path, settings.lease_ttl_s)
        self.reports = ReportServer(self.tokens, self._on_report)
        self.store: EventStore | None = None
        self.table: JobTable | None = None  # type: ignore[assignment]
        self.report_url = ""
        self.ticks = 0
        self.jobs_stepped_last_tick = 0
        self.taken_offer_ids: set[int] = set()  # never rent one offer for two jobs
        self.invalid_markers: set[str] = set()  # jobs whose ignored marker was logged
        self.instances = reconcile.InstanceTracker(settings.sweep_pages_per_tick)
        self.view: reconcile.InstanceView | None = None  # this tick's instances; None if unlisted
        self.limits = load_limits(settings.limit_files())
        self.live_counts = queue.LiveCounts()
        self.queue = queue.QueuePublisher(settings.journal_path)
        # (job id, attempt) to attempt row of every live attempt, taken once per tick
        self.live_rows: dict[tuple[str, int], dict] = {}
        self.settlement = Settlement()
        self.strays = StrayDestroyer()
        self._failed_hosts: dict[int, str] = {}
        self._failed_hosts_tick = -1
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        self.settings.home.mkdir(parents=True, exist_ok=True)
        self.store = await EventStore.open(self.settings.journal_path,
                                           projections=[JobsProjection()])
        await self.lease.acquire()
        self.table = JobTable(self.store)
        await self.table.load()
        await self.table.catch_up()
        await self.settlement.load(self)
        await self.strays.load(self.store)
        port = await self.reports.start(self.settings.report_host, self._report_port())
        (self.settings.home / "supervisor.port").write_text(str(port))
        self.report_url = self.settings.public_report_url or f"http://127.0.0.1:{port}"
        log.info("supervisor started on %s with %d live jobs; reports at %s",
                 self.settings.journal_path, len(self.table.jobs), self.report_url)

    def _report_port(self) -> int:
        # Workers keep the URL they were started with, so a restarted supervisor reuses the port.
        saved = self.settings.home / "supervisor.port"
        if self.settings.report_port == 0 and saved.exists():
            try:
                return int(saved.read_text().strip())
            except ValueError:
                return 0
        return self.settings.report_port

    async def stop(self) -> None:
        self._stopping.set()
        await self.reports.stop()
        if self.store is not None:
            await self.lease.release()
            await self.store.close()
            self.store = None

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self, *, until: Callable[[], bool] | None = None,
                  timeout_s: float | None = None) -> None:
        """Tick until asked to stop, `until()` is true, or the timeout passes."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._stopping.is_set():
            await self.tick()
            if until is not None and until():
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"supervisor did not finish within {timeout_s:.0f} s")
            try:
                await asyncio.wait_for(self._stopping.wait(), self.settings.tick_s)
            except TimeoutError:
                pass

    async def tick(self) -> None:
        """Run one pass: fold new events, list instances, reconcile them, step each job."""
        assert self.table is not None
        self.ticks += 1
        await self.lease.renew()
        await self.table.catch_up()
        instances = self.view = await self.instances.refresh(self)
        if instances is not None:
            await reconcile.reconcile(self, instances)
        if self.settings.report_mode == "mailbox":
            await mailbox.poll_mailboxes(self)
        offers_cache: dict[str, list] = {}
        self.live_rows = self.table.all_live_attempts()
        self.live_counts = queue.LiveCounts.count(self)
        ordered = jobsteps.ordered_jobs(self.table)
        due = jobsteps.jobs_to_step(self, ordered, instances, time.time())
        if instances is not None and await jobsteps.bill_running(self, due, instances):
            # Jobs that were due only for their bill need no step now.
            due = jobsteps.jobs_to_step(self, due, instances, time.time())
        self.jobs_stepped_last_tick = len(due)
        for job_id in due:
            async with self.table.runtime_for(job_id).lock:
                await jobsteps.step_job(self, job_id, instances, offers_cache)
        await budget_guard.enforce(self)
        await self.settlement.run(self)
        await self.queue.publish(queue.waiting_jobs(self, ordered))

    async def failed_hosts(self) -> dict[int, str]:
        """Return hosts that lost attempts of any job lately, read from the journal once per tick."""
        if self._failed_hosts_tick != self.ticks:
            self._failed_hosts = await load_failed_hosts(self.store)
            self._failed_hosts_tick = self.ticks
        return self._failed_hosts

    async def append(self, job_id: str, events: Sequence[ev.JobEvent]) -> bool:
        """Append events at the job's known version; False (and caught up) on a conflict."""
        assert self.store is not None and self.table is not None
        version = self.table.jobs[job_id]["version"]
        try:
            recorded = await self.store.append(job_id, [e.to_new_event() for e in events],
                                               expected_version=version)
        except VersionConflict:
            log.info("job %s changed under us (another writer); re-reading", job_id)
            await self.table.catch_up()
            return False
        await self.table.fold_appended(recorded)
        return True

    async def append_outcome(self, job_id: str, events: Sequence[ev.JobEvent]) -> bool:
        """Append events that record what already happened, even after another writer's events.

        An outcome is a fact, so a version conflict (a `cancel` from the CLI during the call)
        re-reads the stream and appends it after the other writer's events. False only if
        every try conflicted; the reconcile step then settles the attempt by its label.
        """
        for _ in range(OUTCOME_APPEND_TRIES):
            if await self.append(job_id, events):
                return True
        log.error("job %s: could not record %s after %d version conflicts; the next instance "
                  "list settles it", job_id, ", ".join(e.type_name() for e in events),
                  OUTCOME_APPEND_TRIES)
        return False

    async def stop_job(self, job_id: str, reason: str) -> None:
        """Checkpoint, then destroy, then fail the job with `reason` (budget, max duration)."""
        async with self.table.runtime_for(job_id).lock:
            await jobsteps.request_stop(self, job_id, reason)

    def artifact_uri(self, job_id: str) -> str:
        return f"{self.settings.artifact_root.rstrip('/')}/{job_id}"

    async def completion_marker(self, job_id: str) -> CompletionMarker | None:
        """Return the job's completion marker, or None when it is missing or not valid.

        A marker that does not parse, names another job, or contains a step or metric that the
        journal cannot store is logged once per job and ignored, so one damaged file can
        neither crash the supervisor nor keep the job from running.
        """
        storage = open_storage(self.artifact_uri(job_id))
        try:
            if not await storage.exists(COMPLETION_MARKER):
                return None
            text = await storage.get_bytes(COMPLETION_MARKER)
        finally:
            await storage.close()
        try:
            return checked_marker(job_id, text)
        except InvalidMarker as exc:
            if job_id not in self.invalid_markers:
                self.invalid_markers.add(job_id)
                log.warning("job %s: ignoring its completion marker %s: %s", job_id,
                            COMPLETION_MARKER, exc)
            return None

    async def _on_report(self, report) -> str:  # type: ignore[no-untyped-def]
        return await reporting.handle_report(self, report)
