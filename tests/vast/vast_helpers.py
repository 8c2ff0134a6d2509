"""Helpers shared by the Vast.ai client tests."""

from __future__ import annotations

from typing import Any

from gpujobs.emulator import Emulator
from gpujobs.vast import VastClient
from gpujobs.vast.transport import DEFAULT_MIN_INTERVAL_S

NO_PACING = {endpoint: 0.0 for endpoint in DEFAULT_MIN_INTERVAL_S}


def fast_client(emulator: Emulator, **overrides: Any) -> VastClient:
    """A client for the emulator with no pacing and millisecond backoff."""
    options: dict[str, Any] = dict(
        base_url=emulator.url, backoff_base_s=0.001, backoff_cap_s=0.01, timeout_s=5.0,
        deadline_s=20.0, min_interval_s=NO_PACING,
    )
    options.update(overrides)
    api_key = options.pop("api_key", emulator.api_key)
    return VastClient(api_key, **options)
