"""`gpujobs supervise`: the long-running supervisor, against the real API or the emulator."""

from __future__ import annotations

import asyncio
import logging
import signal

from gpujobs.errors import GpujobsError
from gpujobs.settings import Settings
from gpujobs.supervisor.core import Supervisor
from gpujobs.vast.client import VastClient, find_api_key
from gpujobs.vast.transport import DEFAULT_MIN_INTERVAL_S

log = logging.getLogger(__name__)


def supervise_command(settings: Settings, *, pacing_scale: float = 1.0,
                      intent_timeout_s: float = 60.0) -> None:
    logging.getLogger("gpujobs").setLevel(logging.INFO)
    asyncio.run(_supervise(settings, pacing_scale, intent_timeout_s))


async def _supervise(settings: Settings, pacing_scale: float, intent_timeout_s: float) -> None:
    api_key = find_api_key(settings.vast_api_key)
    if api_key is None:
        raise GpujobsError(
            "no Vast.ai API key: set VAST_API_KEY or write it to ~/.config/vastai/vast_api_key"
        )
    intervals = {name: value * pacing_scale for name, value in DEFAULT_MIN_INTERVAL_S.items()}
    client = VastClient(api_key=api_key, base_url=settings.vast_url, min_interval_s=intervals)
    supervisor = Supervisor(settings, client, intent_timeout_s=intent_timeout_s)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, supervisor.request_stop)
    try:
        await supervisor.start()
        await supervisor.run()
    finally:
        await supervisor.stop()
        await client.close()
