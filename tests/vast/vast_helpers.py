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


async def cheap_offer_ids(vast: VastClient, count: int = 1) -> list[int]:
    """Return the ids of the ``count`` cheapest 1x RTX 4090 offers."""
    offers = await vast.search_offers("gpu_name=RTX_4090 num_gpus=1", order="dph", limit=count)
    return [offer.id for offer in offers]


async def cheapest_offer_id(vast: VastClient) -> int:
    return (await cheap_offer_ids(vast, 1))[0]
