"""`gpujobs supervise`: the long-running supervisor, against the real API or the emulator."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket

from gpujobs.errors import GpujobsError
from gpujobs.jobs import make_home
from gpujobs.settings import Settings
from gpujobs.supervisor.core import Supervisor, freeze_startup_objects
from gpujobs.vast.client import VastClient, find_api_key
from gpujobs.vast.errors import AuthError, VastError
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
    make_home(settings.home)
    await _check_report_host(settings.report_host)
    intervals = {name: value * pacing_scale for name, value in DEFAULT_MIN_INTERVAL_S.items()}
    client = VastClient(api_key=api_key, base_url=settings.vast_url, min_interval_s=intervals)
    supervisor = Supervisor(settings, client, intent_timeout_s=intent_timeout_s)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, supervisor.request_stop)
    try:
        await _check_api_key(client)
        await _start(supervisor, settings)
        log.debug("%d objects exempted from garbage collection", freeze_startup_objects())
        await supervisor.run()
    finally:
        await supervisor.stop()
        await client.close()


async def _check_api_key(client: VastClient) -> None:
    """Stop at start when the API rejects the key; other failures are retried by the ticks."""
    try:
        await client.current_user()
    except AuthError as exc:
        raise GpujobsError(
            f"Vast.ai at {client.base_url} rejected the API key (HTTP {exc.status}); set "
            "VAST_API_KEY to a valid key"
        ) from None
    except VastError as exc:
        log.warning("could not check the API key at start, continuing: %s", exc)


async def _check_report_host(host: str) -> None:
    loop = asyncio.get_running_loop()
    try:
        await loop.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError) as exc:
        raise GpujobsError(
            f"GPUJOBS_REPORT_HOST={host!r} is not a host name or address ({exc}); set it to "
            "an address of this machine, such as 127.0.0.1 or 0.0.0.0"
        ) from None


async def _start(supervisor: Supervisor, settings: Settings) -> None:
    try:
        await supervisor.start()
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise
        raise GpujobsError(
            f"cannot serve worker reports on {settings.report_host} ({exc.strerror}); stop the "
            "program using the port, set GPUJOBS_REPORT_PORT to a free port (0: any), or set "
            "GPUJOBS_REPORT_HOST to an address of this machine"
        ) from None
