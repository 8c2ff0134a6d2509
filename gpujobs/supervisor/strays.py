"""Destroys of stray instances: our label, but no live attempt in the journal owns them.

Each DELETE follows a `StrayDestroyRequested` intent on the supervisor's stream, and the outcome
is `StrayDestroyed` once the API reports the instance gone (a 404, or a finished sweep of the
list that no longer shows it). A DELETE that fails is retried with capped exponential backoff,
and its failures are journaled as `StrayDestroyFailed`. After a restart, intents without an
outcome are read back, so a stray that vanished while no supervisor ran is still recorded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from journal import EventStore, VersionConflict

from gpujobs import events as ev
from gpujobs.projections import parse_label
from gpujobs.supervisor.instances import destroy_backoff_s, failure_is_reported
from gpujobs.vast import errors as vast_errors
from gpujobs.vast.records import Instance

if TYPE_CHECKING:
    from gpujobs.supervisor.core import Supervisor
    from gpujobs.supervisor.reconcile import InstanceView

log = logging.getLogger(__name__)

@dataclass
class Stray:
    instance_id: int
    label: str
    requested: bool = False  # an intent is journaled, by this run or an earlier one
    sent_at: float | None = None  # when the API last accepted a DELETE
    failures: int = 0
    retry_at: float = 0.0
    missing_lists: int = 0  # finished sweeps in a row that did not show the instance


class StrayDestroyer:
    """Destroys stray instances and keeps the supervisor's stream of those destroys."""

    def __init__(self) -> None:
        self.pending: dict[int, Stray] = {}  # by instance id
        self.version = 0  # of the supervisor's stream; only the lease holder appends to it

    async def load(self, store: EventStore) -> None:
        """Read back the intents that have no outcome yet."""
        for event in await store.read_stream(ev.SUPERVISOR_STREAM):
            self.version = event.version
            instance_id = int(event.data.get("instance_id") or 0)
            if event.type == "StrayDestroyRequested":
                self.pending[instance_id] = Stray(instance_id, event.data["label"],
                                                  requested=True)
            elif event.type == "StrayDestroyed":
                self.pending.pop(instance_id, None)

    async def destroy(self, sup: Supervisor, instance: Instance, reason: str) -> None:
        """Send a DELETE for a stray, unless one is in backoff or was accepted a moment ago."""
        stray = self.pending.get(instance.id)
        if stray is None:
            stray = self.pending[instance.id] = Stray(instance.id, instance.label or "")
        stray.missing_lists = 0
        now = time.time()
        if now < stray.retry_at:
            return
        if stray.sent_at is not None and now - stray.sent_at < sup.destroy_resend_s:
            return  # accepted; a later list shows whether it went through
        if stray.sent_at is None and stray.failures == 0:
            log.warning("destroying stray instance %d (label %r): %s", instance.id,
                        instance.label, reason)
        else:
            log.warning("stray instance %d is still listed; sending DELETE again", instance.id)
        await sup.lease.ensure_held()
        await self._append(sup, ev.StrayDestroyRequested(instance.id, stray.label, reason))
        stray.requested = True
        try:
            await sup.client.destroy_instance(instance.id)
        except vast_errors.InstanceNotFound:
            await self._confirm(sup, stray)
            return
        except vast_errors.VastError as exc:
            await self._failed(sup, stray, now, exc)
            return
        stray.sent_at = now

    async def _failed(self, sup: Supervisor, stray: Stray, now: float,
                      exc: vast_errors.VastError) -> None:
        stray.failures += 1
        delay_s = destroy_backoff_s(stray.failures)
        stray.retry_at = now + delay_s
        log.warning("destroy of stray instance %d failed (try %d), retrying in %.0f s: %s",
                    stray.instance_id, stray.failures, delay_s, exc)
        if failure_is_reported(stray.failures):
            await self._append(sup, ev.StrayDestroyFailed(stray.instance_id, stray.label,
                                                          str(exc), delay_s))

    async def settle(self, sup: Supervisor, view: InstanceView) -> None:
        """After a finished sweep: record strays that it no longer shows as destroyed.

        One missing sweep is enough after an accepted DELETE, two otherwise, as for attempts.
        """
        for stray in list(self.pending.values()):
            key = parse_label(stray.label)
            listed = None if key is None else view.known.get(key)
            if stray.instance_id in view.duplicates or (
                    listed is not None and listed.id == stray.instance_id):
                stray.missing_lists = 0
                continue
            stray.missing_lists += 1
            if stray.sent_at is None and stray.missing_lists < 2:
                continue
            await self._confirm(sup, stray)

    async def _confirm(self, sup: Supervisor, stray: Stray) -> None:
        if stray.requested:
            await self._append(sup, ev.StrayDestroyed(stray.instance_id, stray.label))
            log.info("stray instance %d (label %r) is destroyed", stray.instance_id, stray.label)
        self.pending.pop(stray.instance_id, None)

    async def _append(self, sup: Supervisor, event: ev.JobEvent) -> None:
        assert sup.store is not None
        stream = ev.SUPERVISOR_STREAM
        try:
            await sup.store.append(stream, [event.to_new_event()], expected_version=self.version)
        except VersionConflict:
            # Only the lease holder writes here, so a conflict means an earlier holder wrote
            # after this one loaded. Its events are facts too: append after them.
            self.version = await sup.store.stream_version(stream)
            await sup.store.append(stream, [event.to_new_event()], expected_version=self.version)
        self.version += 1
