"""`gpujobs supervise`: the long-running supervisor, against the real API or the emulator."""

from __future__ import annotations

import asyncio
import logging
import signal

from gpujobs.errors import GpujobsError
from gpujobs.settings import Settings
from gpujobs.supervisor.core import Supervisor
from gpujobs.vast.client import VastClient, find_api_key

log = logging.getLogger(__name__)


def supervise_command(settings: Settings) -> None:
    logging.getLogger("gpujobs").setLevel(logging.INFO)
    asyncio.run(_supervise(settings))


async def _supervise(settings: Settings) -> None:
    api_key = find_api_key(settings.vast_api_key)
    if api_key is None:
        raise GpujobsError(
            "no Vast.ai API key: set VAST_API_KEY or write it to ~/.config/vastai/vast_api_key"
        )
    client = VastClient(api_key=api_key, base_url=settings.vast_url)
    supervisor = Supervisor(settings, client)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, supervisor.request_stop)
    try:
        await supervisor.start()
        await supervisor.run()
    finally:
        await supervisor.stop()
        await client.close()
