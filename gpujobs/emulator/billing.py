"""Per-second billing of one emulated instance, split into GPU and disk charges.

Billed seconds are real seconds times ``time_scale``, so a test can bill an hour in seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Meter:
    """Accumulates cost at rates (in $/hour) that change with the instance state."""

    time_scale: float = 1.0
    gpu_dph: float = 0.0
    disk_dph: float = 0.0
    gpu_usd: float = 0.0
    disk_usd: float = 0.0
    gpu_billed_s: float = 0.0
    _since: float | None = None

    def _settle(self, now: float) -> None:
        if self._since is not None:
            billed_s = max(0.0, now - self._since) * self.time_scale
            self.gpu_usd += billed_s * self.gpu_dph / 3600.0
            self.disk_usd += billed_s * self.disk_dph / 3600.0
            if self.gpu_dph > 0:
                self.gpu_billed_s += billed_s
        self._since = now

    def set_rates(self, gpu_dph: float, disk_dph: float, now: float | None = None) -> None:
        """Bill the time so far at the old rates, then switch to the new ones."""
        self._settle(time.monotonic() if now is None else now)
        self.gpu_dph, self.disk_dph = gpu_dph, disk_dph

    def totals(self, now: float | None = None) -> tuple[float, float]:
        """Return (gpu_usd, disk_usd) billed up to ``now``."""
        self._settle(time.monotonic() if now is None else now)
        return self.gpu_usd, self.disk_usd

    def total_usd(self, now: float | None = None) -> float:
        gpu_usd, disk_usd = self.totals(now)
        return gpu_usd + disk_usd
