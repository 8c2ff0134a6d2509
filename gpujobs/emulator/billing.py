"""Per-second billing of one emulated instance, split into GPU and disk charges.

Billed seconds are real seconds times ``time_scale``, so a test can bill an hour in seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class FleetSpend:
    """The sum of many meters' totals, kept current at O(1) cost per meter update.

    The sum at `now` is `settled_usd + usd_per_s * now - weighted_since`: what the meters had
    billed when each last settled, plus each rate times the time since then.
    """

    settled_usd: float = 0.0
    usd_per_s: float = 0.0  # sum of the meters' current rates, in dollars per real second
    weighted_since: float = 0.0  # sum of each meter's rate times its last settle time

    def total_usd(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        return self.settled_usd + self.usd_per_s * now - self.weighted_since


@dataclass
class Meter:
    """Accumulates cost at rates (in $/hour) that change with the instance state."""

    time_scale: float = 1.0
    gpu_dph: float = 0.0
    disk_dph: float = 0.0
    gpu_usd: float = 0.0
    disk_usd: float = 0.0
    gpu_billed_s: float = 0.0
    fleet: FleetSpend | None = None  # a sum over meters that this one keeps current
    _since: float | None = None

    def _usd_per_s(self) -> float:
        return (self.gpu_dph + self.disk_dph) * self.time_scale / 3600.0

    def _settle(self, now: float) -> None:
        if self._since is not None:
            elapsed_s = max(0.0, now - self._since)
            billed_s = elapsed_s * self.time_scale
            self.gpu_usd += billed_s * self.gpu_dph / 3600.0
            self.disk_usd += billed_s * self.disk_dph / 3600.0
            if self.gpu_dph > 0:
                self.gpu_billed_s += billed_s
            if self.fleet is not None:
                usd = elapsed_s * self._usd_per_s()
                self.fleet.settled_usd += usd
                self.fleet.weighted_since += usd
        self._since = now

    def set_rates(self, gpu_dph: float, disk_dph: float, now: float | None = None) -> None:
        """Bill the time so far at the old rates, then switch to the new ones."""
        now = time.monotonic() if now is None else now
        self._settle(now)
        before = self._usd_per_s()
        self.gpu_dph, self.disk_dph = gpu_dph, disk_dph
        if self.fleet is not None:
            change = self._usd_per_s() - before
            self.fleet.usd_per_s += change
            self.fleet.weighted_since += change * now

    def totals(self, now: float | None = None) -> tuple[float, float]:
        """Return (gpu_usd, disk_usd) billed up to ``now``."""
        self._settle(time.monotonic() if now is None else now)
        return self.gpu_usd, self.disk_usd

    def total_usd(self, now: float | None = None) -> float:
        gpu_usd, disk_usd = self.totals(now)
        return gpu_usd + disk_usd
