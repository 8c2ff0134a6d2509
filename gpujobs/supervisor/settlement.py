"""Settle each destroyed instance's cost against the provider's charges.

While an instance lives, the journal bills it from what the supervisor observes: the rate in each
list, and estimates of when a rate changed or a create or destroy took effect. Once the
instance is destroyed and the charges endpoint shows it, one `CostAccrued` with `settled_usd`
brings the attempt's cost to the provider's figure. An instance the charges never show within
the settle window keeps the journal's estimate, and a warning names it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpujobs import events as ev
from gpujobs.cost_report import charges_by_instance
from gpujobs.projections import ATTEMPT_COLUMNS, DESTROYED, decode_row
from gpujobs.vast import errors as vast_errors

if TYPE_CHECKING:
    from gpujobs.supervisor.core import Supervisor

log = logging.getLogger(__name__)

Key = tuple[str, int]


@dataclass
class Unsettled:
    """A destroyed attempt whose cost the provider's charges have not confirmed yet."""

    instance_id: int
    created_at: float
    destroyed_at: float
    journal_usd: float
    dph_total: float
    billed_through: float


class Settlement:
    def __init__(self) -> None:
        self.pending: dict[Key, Unsettled] = {}
        self.last_query_at = 0.0
        self.settled = 0

    def add(self, job_id: str, row: dict[str, Any]) -> None:
        """Queue a destroyed attempt, from its row in the attempts projection."""
        if row.get("instance_id") is None or row.get("status") != DESTROYED:
            return
        destroyed_at = float(row["destroyed_at"] or time.time())
        self.pending[(job_id, int(row["attempt"]))] = Unsettled(
            int(row["instance_id"]), float(row["created_at"] or destroyed_at), destroyed_at,
            float(row["cost_usd"] or 0.0), float(row["dph_total"] or 0.0),
            float(row["billed_through"] or destroyed_at),
        )

    async def load(self, sup: Supervisor) -> None:
        """Queue the attempts destroyed within the window that no event has settled."""
        assert sup.store is not None
        since = time.time() - sup.settings.settle_window_s
        settled = {
            (stream, int(attempt)) for stream, attempt in await sup.store.query(
                "SELECT stream, json_extract(data, '$.attempt') FROM events"
                " WHERE type = 'CostAccrued' AND recorded_at >= ?"
                " AND json_extract(data, '$.settled_usd') IS NOT NULL", (since,))
        }
        rows = await sup.store.query(
            f"SELECT {', '.join(ATTEMPT_COLUMNS)} FROM attempts"
            " WHERE status = ? AND destroyed_at >= ? AND instance_id IS NOT NULL",
            (DESTROYED, since),
        )
        for values in rows:
            row = decode_row(ATTEMPT_COLUMNS, tuple(values))
            if (row["job_id"], int(row["attempt"])) not in settled:
                self.add(row["job_id"], row)

    async def run(self, sup: Supervisor) -> None:
        """Settle what the charges show, with at most one charges query per interval."""
        now = time.time()
        settings = sup.settings
        due = {key: item for key, item in self.pending.items()
               if now - item.destroyed_at >= settings.settle_delay_s}
        if not due or now - self.last_query_at < settings.settle_interval_s:
            return
        self.last_query_at = now
        start = min(item.created_at for item in due.values())
        try:
            charges = await sup.client.charges(start=start - 60.0, end=now)
        except vast_errors.VastError as exc:
            log.warning("charges query failed; settling %d destroyed instances later: %s",
                        len(due), exc)
            return
        charged = charges_by_instance(charges)
        for key, item in due.items():
            if item.instance_id in charged:
                await self._settle(sup, key, item, charged[item.instance_id])
            elif now - item.destroyed_at > settings.settle_window_s:
                log.warning("job %s attempt %d: the charges never showed instance %d; its cost "
                            "stays the journal's estimate, $%.6f", key[0], key[1],
                            item.instance_id, item.journal_usd)
                self.pending.pop(key, None)

    async def _settle(self, sup: Supervisor, key: Key, item: Unsettled, charged_usd: float) -> None:
        job_id, attempt = key
        event = ev.CostAccrued(attempt, item.instance_id, charged_usd - item.journal_usd, 0.0,
                               item.dph_total, item.billed_through, settled_usd=charged_usd)
        if not await sup.table.ensure_loaded(job_id):
            self.pending.pop(key, None)
            return
        async with sup.table.runtime_for(job_id).lock:
            if await sup.append(job_id, [event]):
                self.pending.pop(key, None)
                self.settled += 1

