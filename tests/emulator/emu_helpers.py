"""Helpers shared by the emulator tests."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import aiohttp

from gpujobs.emulator import Emulator
from gpujobs.vast import VastClient
from gpujobs.vast.transport import DEFAULT_MIN_INTERVAL_S

NO_PACING = {endpoint: 0.0 for endpoint in DEFAULT_MIN_INTERVAL_S}


def client_for(emulator: Emulator, **overrides: Any) -> VastClient:
    options: dict[str, Any] = dict(base_url=emulator.url, backoff_base_s=0.001,
                                   backoff_cap_s=0.01, min_interval_s=NO_PACING)
    options.update(overrides)
    return VastClient(options.pop("api_key", emulator.api_key), **options)


async def raw(emulator: Emulator, method: str, path: str, *, key: str | None = "valid",
              **kwargs: Any) -> tuple[int, str, Any]:
    """Send one request; return (status, content type, parsed JSON or text)."""
    headers = dict(kwargs.pop("headers", {}))
    if key == "valid":
        headers["Authorization"] = f"Bearer {emulator.api_key}"
    elif key is not None:
        headers["Authorization"] = f"Bearer {key}"
    async with aiohttp.ClientSession() as session:
        async with session.request(method, emulator.url + path, headers=headers,
                                   **kwargs) as response:
            text = await response.text()
            content_type = response.headers.get("Content-Type", "")
    try:
        return response.status, content_type, json.loads(text)
    except ValueError:
        return response.status, content_type, text


async def wait_for(predicate, timeout_s: float = 15.0, interval_s: float = 0.05):
    """Poll ``predicate`` (sync or async) until it returns a truthy value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(interval_s)


async def wait_for_status(vast: VastClient, instance_id: int, status: str,
                          timeout_s: float = 15.0):
    async def reached():
        inst = await vast.show_instance(instance_id)
        return inst if inst is not None and inst.actual_status == status else None
    return await wait_for(reached, timeout_s)


async def cheap_offer(vast: VastClient, gpu: str = "RTX_4090") -> int:
    offers = await vast.search_offers(f"gpu_name={gpu} num_gpus=1", order="dph", limit=1)
    return offers[0].id


async def start_server(argv: list[str], cwd) -> tuple[asyncio.subprocess.Process, dict[str, str]]:
    """Start an emulator command line with fault rules and read its banner.

    The banner ends with the fault rules line, which only a server with rules prints.
    Returns the process and the banner's values: ``url``, ``key`` (when generated) and
    ``faults`` (the kinds of the rules).
    """
    env = {name: value for name, value in os.environ.items()
           if name not in ("VAST_API_KEY", "VAST_URL")}
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        cwd=cwd,
    )
    banner: dict[str, str] = {}
    prefixes = {"export VAST_URL=": "url", "export VAST_API_KEY=": "key",
                "fault rules: ": "faults"}
    while "faults" not in banner:
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
        if not line:
            raise AssertionError(f"the emulator exited before its banner ended: {banner}")
        for prefix, name in prefixes.items():
            if line.startswith(prefix):
                banner[name] = line.removeprefix(prefix)
    return process, banner


async def stop_server(process: asyncio.subprocess.Process) -> tuple[int, bytes]:
    """Send SIGTERM and return the exit code and the rest of stdout."""
    process.send_signal(signal.SIGTERM)
    rest = await asyncio.wait_for(process.stdout.read(), 30)
    return await process.wait(), rest
