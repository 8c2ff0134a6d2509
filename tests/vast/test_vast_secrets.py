"""The API key never shows up in logs, error messages or reprs."""

from __future__ import annotations

import logging

import pytest

from gpujobs.emulator import Emulator, FaultPlan
from gpujobs.vast import VastClient, errors

from vast_helpers import NO_PACING

KEY = "sk-test-3f9c1a7d5e2b4c6a8d0f1e3b5a7c9d2e"


async def test_key_absent_from_logs_and_errors(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    plan = FaultPlan.from_data([
        {"kind": "burst_429", "endpoint": "POST /bundles/", "count": 2},
        {"kind": "burst_5xx", "endpoint": "GET /api/v1/instances/", "count": 9},
        {"kind": "malformed", "endpoint": "GET /users/current/", "form": "truncated"},
    ])
    emu = Emulator(seed=1, api_key=KEY, loading_s=0.1, rate_limits=False, faults=plan,
                   workdir=tmp_path / "emu")
    await emu.start()
    texts: list[str] = []
    try:
        vast = VastClient(KEY, base_url=emu.url, max_attempts=3, backoff_base_s=0.001,
                          min_interval_s=NO_PACING)
        texts.append(repr(vast))
        texts.append(str(vars(vast)))
        offers = await vast.search_offers(limit=2)
        failures = [
            vast.list_instances(), vast.current_user(), vast.destroy_instance(5),
            vast.create_instance(offers[0].id, image="busybox", price=0.0001),
        ]
        for call in failures:
            with pytest.raises(errors.VastError) as caught:
                await call
            texts += [str(caught.value), repr(caught.value), str(caught.value.__cause__)]
        await vast.close()
        async with VastClient("wrong-" + KEY, base_url=emu.url) as wrong:
            with pytest.raises(errors.AuthError) as caught:
                await wrong.current_user()
            texts.append(str(caught.value))
    finally:
        await emu.stop()

    texts += [record.getMessage() for record in caplog.records]
    assert len(caplog.records) > 3, "expected retry warnings and info lines to inspect"
    leaks = [text for text in texts if KEY in text]
    assert leaks == []
