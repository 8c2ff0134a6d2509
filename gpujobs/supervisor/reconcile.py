"""Match the API's instance list to the journal by label.

The number of API calls per tick does not grow with the number of healthy jobs:

- every tick lists only the instances that are not running (`actual_status != running`):
  loading, stopped, exited or offline machines, the only ones that need a decision;
- a full sweep of the paged list advances a few pages per tick and, once it reaches the last
  page, replaces the supervisor's record of instances. Only a finished sweep may conclude that an
  instance is gone, and only after two sweeps in a row missed it.

Instances with our label prefix are adopted (an intent without an outcome), confirmed gone (a
destroy that went through), or destroyed as strays (no live attempt owns them, or another
instance already carries the label, see strays.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gpujobs import events as ev
from gpujobs.projections import CREATE_FAILED, DESTROYED, REQUESTED, parse_label
from gpujobs.supervisor import instances as inst
from gpujobs.supervisor.instance_table import InstanceTable, Key, slim
from gpujobs.vast import errors as vast_errors
from gpujobs.vast.records import Instance

if TYPE_CHECKING:
    from gpujobs.supervisor.core import Supervisor

log = logging.getLogger(__name__)

RecordedId = Callable[[Key], "int | None"]  # the instance id the journal records for a label
NOT_RUNNING = {"actual_status": {"neq": "running"}}


@dataclass
class InstanceView:
    """Our instances as of one tick: fresh data overlaid on the last full sweep."""

    known: dict[Key, Instance] = field(default_factory=dict)
    complete: bool = False  # a sweep finished this tick: absence from `known` means gone
    fresh: dict[Key, Instance] = field(default_factory=dict)  # listed during this tick
    # When this tick's list of not-running instances was taken. Every instance in `known` reads
    # as of then: those not in `fresh` were running at that moment.
    listed_at: float = field(default_factory=time.time)
    # Instances listed this tick under a label that another instance in `known` carries.
    duplicates: dict[int, Instance] = field(default_factory=dict)

    def get(self, key: Key) -> Instance | None:
        return self.known.get(key)


class InstanceTracker:
    """Keeps the sweep's position and the instances seen, across ticks."""

    def __init__(self, pages_per_tick: int) -> None:
        self.pages_per_tick = pages_per_tick
        self.known: dict[Key, Instance] = InstanceTable()
        self._sweep: dict[Key, Instance] = InstanceTable()
        self._sweep_duplicates: dict[int, Instance] = {}
        self._token: str | None = None
        self._troubled: set[Key] = set()
        self.sweeps_completed = 0
        self.calls_last_tick = 0

    def forget(self, key: Key) -> None:
        self.known.pop(key, None)
        self._sweep.pop(key, None)

    async def refresh(self, sup: Supervisor) -> InstanceView | None:
        """List what this tick may; None if the API failed (no decision rests on a failed list)."""
        self.calls_last_tick = 0
        recorded_id = _recorded_id(sup)
        duplicates: dict[int, Instance] = {}
        try:
            started = time.time()
            troubled = await self._list_troubled(sup, duplicates, recorded_id)
            listed_at = (started + time.time()) / 2.0
            complete = await self._advance_sweep(sup, recorded_id)
        except vast_errors.VastError as exc:
            log.warning("instance list failed; skipping reconcile this tick: %s", exc)
            return None
        view = InstanceView(complete=complete, listed_at=listed_at, duplicates=duplicates)
        if complete:
            self.known = self._sweep
            self._sweep = InstanceTable()
            duplicates.update(self._sweep_duplicates)
            self._sweep_duplicates = {}
            self.sweeps_completed += 1
        for key in self._troubled - troubled.keys():
            # Left the not-running list: it runs now, whatever the last sweep recorded.
            old = self.known.get(key)
            if old is not None and old.actual_status != "running":
                self.known[key] = dataclasses.replace(old, actual_status="running",
                                                      cur_state="running")
        for key, instance in list(troubled.items()):
            if not _place(key, instance, self.known, duplicates, recorded_id):
                del troubled[key]  # the label's instance in the view is another one
        self._troubled = set(troubled)
        view.known = self.known
        view.fresh = troubled
        return view

    async def _list_troubled(self, sup: Supervisor, duplicates: dict[int, Instance],
                             recorded_id: RecordedId) -> dict[Key, Instance]:
        found: dict[Key, Instance] = {}
        token: str | None = None
        while True:
            page, token = await sup.client.list_instances_page(filters=NOT_RUNNING,
                                                               after_token=token)
            self.calls_last_tick += 1
            _index(page, found, duplicates, recorded_id)
            if not token:
                return found

    async def _advance_sweep(self, sup: Supervisor, recorded_id: RecordedId) -> bool:
        for _ in range(self.pages_per_tick):
            page, self._token = await sup.client.list_instances_page(after_token=self._token)
            self.calls_last_tick += 1
            _index(page, self._sweep, self._sweep_duplicates, recorded_id)
            if not self._token:
                return True
        return False


def _index(page: list[Instance], into: dict[Key, Instance], duplicates: dict[int, Instance],
           recorded_id: RecordedId) -> None:
    """Place each labelled instance of a page, slimmed to the fields the supervisor reads.

    The tick's not-running list and the duplicates are plain dicts, and during an outage they
    can hold thousands of instances, so they get no full API rows either.
    """
    for instance in page:
        key = parse_label(instance.label)
        if key is not None:
            _place(key, slim(instance), into, duplicates, recorded_id)


def _place(key: Key, instance: Instance, into: dict[Key, Instance],
           duplicates: dict[int, Instance], recorded_id: RecordedId) -> bool:
    """Put an instance under its label; False if another one keeps the label instead.

    When two instances carry one label, the one the journal records keeps it (or the older
    one, if the journal records neither), and the other goes to `duplicates`.
    """
    current = into.get(key)
    if current is None or current.id == instance.id:
        into[key] = instance
        return True
    recorded = recorded_id(key)
    if instance.id == recorded or (current.id != recorded and instance.id < current.id):
        into[key] = instance
        duplicates[current.id] = current
        return True
    duplicates[instance.id] = instance
    return False


def _recorded_id(sup: Supervisor) -> RecordedId:
    attempts = sup.table.attempts

    def recorded_id(key: Key) -> int | None:
        row = attempts.get(key[0], {}).get(key[1])
        return None if row is None else row["instance_id"]

    return recorded_id


async def reconcile(sup: Supervisor, view: InstanceView) -> None:
    table = sup.table
    checked = view.known if view.complete else view.fresh
    # The keys first, and each instance only when it is acted on: after a sweep `known` contains
    # every instance, and most of them need nothing.
    for key in list(checked):
        job_id, attempt = key
        job = table.jobs.get(job_id)
        row = None if job is None else table.attempt_row(job_id, attempt)
        if row is not None and row["status"] not in (DESTROYED, REQUESTED, CREATE_FAILED):
            continue
        instance = checked.get(key)
        if instance is None:
            continue  # forgotten while an earlier instance was handled
        if row is None or row["status"] == DESTROYED:
            await _destroy_stray(sup, instance)
            continue
        # An intent without an outcome, or one the journal gave up on. The machine exists,
        # so record it, and the job's steps then keep or destroy it.
        async with table.runtime_for(job_id).lock:
            await _adopt(sup, job_id, attempt, instance)
    for instance in list(view.duplicates.values()):
        await sup.strays.destroy(sup, instance, "another instance carries the same label")
    if view.complete:
        await _settle_missing(sup, view)
        await sup.strays.settle(sup, view)


async def _adopt(sup: Supervisor, job_id: str, attempt: int, instance: Instance) -> None:
    log.info("job %s attempt %d: adopting instance %d found by label", job_id, attempt,
             instance.id)
    await sup.append(job_id, [
        ev.InstanceCreated(attempt, instance.id, instance.label or "",
                           float(instance.dph_total or 0.0), adopted=True)
    ])


async def _destroy_stray(sup: Supervisor, instance: Instance) -> None:
    # NOTE: a label with our prefix but no live attempt in this journal is taken as a leak of
    # ours, so two journals must not share one Vast.ai account.
    await sup.strays.destroy(sup, instance, "no live attempt in the journal owns its label")


async def _settle_missing(sup: Supervisor, view: InstanceView) -> None:
    """Attempts the journal thinks are alive but a finished sweep did not show."""
    table = sup.table
    now = time.time()
    for job_id in list(table.jobs):
        for row in table.live_attempts(job_id):
            attempt = int(row["attempt"])
            state = table.runtime_for(job_id).attempt(attempt)
            if (job_id, attempt) in view.known:
                state.missing_lists = 0
                continue
            async with table.runtime_for(job_id).lock:
                await _settle_one(sup, job_id, row, now, view)


async def _settle_one(sup: Supervisor, job_id: str, row: dict, now: float,
                      view: InstanceView) -> None:
    attempt = int(row["attempt"])
    if row["status"] == REQUESTED:
        requested_at = row["requested_at"] or now
        if now - requested_at < sup.intent_timeout_s:
            return  # the create may still be in flight or not yet listed
        await sup.append(job_id, [
            ev.InstanceCreateFailed(attempt, int(row["offer_id"] or 0), "NotListed",
                                    "no instance with this attempt's label appeared"),
        ])
        return
    # Created or being destroyed, and no longer listed. One missing sweep is enough after a
    # DELETE went through; otherwise wait for a second one, in case a page shifted under us.
    state = sup.table.runtime_for(job_id).attempt(attempt)
    state.missing_lists += 1
    if state.destroy_sent_at is None and state.missing_lists < 2:
        return
    # After our accepted DELETE, absence from the list confirms the destroy. Without one, the
    # instance vanished on its own or a sweep skipped it, so one show call decides (rare, and
    # paced at one per 2 s by the API, so it is not spent on every destroy).
    if state.destroy_sent_at is None and not await _gone_by_show(sup, job_id, row, view):
        return
    await inst.confirm_destroyed(sup, job_id, attempt)


async def _gone_by_show(sup: Supervisor, job_id: str, row: dict, view: InstanceView) -> bool:
    """Ask the API whether an instance that the sweeps no longer list is really gone.

    Only a show call that returns no instance counts. A listed instance goes back into the
    view, and a failed call leaves the decision to a later sweep.
    """
    attempt = int(row["attempt"])
    instance_id = row["instance_id"]
    if instance_id is None:
        return True
    try:
        fresh = await sup.client.show_instance(int(instance_id))
    except vast_errors.VastError as exc:
        log.warning("job %s attempt %d: show of unlisted instance %s failed; deciding later: %s",
                    job_id, attempt, instance_id, exc)
        return False
    if fresh is None:
        return True
    log.info("job %s attempt %d: instance %d was missing from the sweeps but is %s",
             job_id, attempt, fresh.id, fresh.actual_status)
    view.known[(job_id, attempt)] = dataclasses.replace(fresh, extra_env={}, ports={})
    sup.table.runtime_for(job_id).attempt(attempt).missing_lists = 0
    return False
