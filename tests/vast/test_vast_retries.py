"""Retry paths of the client, counted at the emulator: backoff, Retry-After, deadline, pacing."""

from __future__ import annotations

import logging
import time

import pytest

from gpujobs.emulator import Emulator, FaultPlan
from gpujobs.vast import errors

from vast_helpers import fast_client


async def started(tmp_path, rules, **options) -> Emulator:
    options.setdefault("rate_limits", False)
    emu = Emulator(seed=5, loading_s=0.2, workdir=tmp_path / "emu",
                   faults=FaultPlan.from_data(rules), **options)
    await emu.start()
    return emu


def retry_warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.levelno == logging.WARNING and record.getMessage().startswith("retrying")]


async def test_429_burst_then_success(tmp_path, caplog):
    emu = await started(tmp_path, [{"kind": "burst_429", "endpoint": "POST /bundles/",
                                    "count": 2}])
    try:
        async with fast_client(emu, max_attempts=5) as vast:
            offers = await vast.search_offers(limit=2)
        assert len(offers) == 2
        assert emu.request_count("POST /bundles/") == 3
        warnings = retry_warnings(caplog)
        assert len(warnings) == 2
        assert "POST /bundles/" in warnings[0]
        assert "HTTP 429" in warnings[0]
        assert "attempt 1 of 5" in warnings[0]
        assert "attempt 2 of 5" in warnings[1]
    finally:
        await emu.stop()


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_gateway_errors_retried(tmp_path, status):
    emu = await started(tmp_path, [{"kind": "burst_5xx", "endpoint": "GET /api/v1/instances/",
                                    "count": 2, "status": status}])
    try:
        async with fast_client(emu) as vast:
            assert await vast.list_instances() == []
        assert emu.request_count("GET /api/v1/instances/") == 3
    finally:
        await emu.stop()


async def test_500_not_retried(tmp_path):
    emu = await started(tmp_path, [{"kind": "burst_5xx", "endpoint": "POST /bundles/",
                                    "count": 1, "status": 500}])
    try:
        async with fast_client(emu) as vast:
            with pytest.raises(errors.ServerError):
                await vast.search_offers(limit=1)
        assert emu.request_count("POST /bundles/") == 1
    finally:
        await emu.stop()


async def test_attempts_exhausted(tmp_path):
    emu = await started(tmp_path, [{"kind": "burst_429", "endpoint": "POST /bundles/",
                                    "count": 10}])
    try:
        async with fast_client(emu, max_attempts=3) as vast:
            with pytest.raises(errors.RateLimited):
                await vast.search_offers(limit=1)
        assert emu.request_count("POST /bundles/") == 3
    finally:
        await emu.stop()


async def test_retry_after_honoured(tmp_path, caplog):
    emu = await started(tmp_path, [{"kind": "burst_429", "endpoint": "POST /bundles/",
                                    "count": 1, "retry_after_s": 0.5}])
    try:
        async with fast_client(emu, backoff_base_s=0.0) as vast:
            started_at = time.monotonic()
            await vast.search_offers(limit=1)
            waited_s = time.monotonic() - started_at
        assert emu.request_count("POST /bundles/") == 2
        assert "waiting 0.50s" in retry_warnings(caplog)[0]
        assert waited_s >= 0.5
    finally:
        await emu.stop()


async def test_retry_after_over_cap_not_retried(tmp_path):
    emu = await started(tmp_path, [{"kind": "burst_429", "endpoint": "POST /bundles/",
                                    "count": 1, "retry_after_s": 120}])
    try:
        async with fast_client(emu, retry_after_cap_s=60.0) as vast:
            with pytest.raises(errors.RateLimited) as caught:
                await vast.search_offers(limit=1)
        assert caught.value.retry_after_s == 120
        assert emu.request_count("POST /bundles/") == 1
    finally:
        await emu.stop()


async def test_deadline_runs_out_across_retries(tmp_path, caplog):
    # Two short waits fit the deadline. The third reply's Retry-After ends past it.
    emu = await started(tmp_path, [
        {"kind": "burst_429", "endpoint": "POST /bundles/", "count": 2, "retry_after_s": 0.05},
        {"kind": "burst_429", "endpoint": "POST /bundles/", "count": 1, "retry_after_s": 30},
    ])
    try:
        async with fast_client(emu, deadline_s=5.0, max_attempts=10,
                               retry_after_cap_s=60.0) as vast:
            with pytest.raises(errors.DeadlineExceeded) as caught:
                await vast.search_offers(limit=1)
        assert caught.value.status == 429
        assert "after 3 attempts" in str(caught.value)
        assert emu.request_count("POST /bundles/") == 3
        assert len(retry_warnings(caplog)) == 2
    finally:
        await emu.stop()


async def test_timeout_retried_then_success(tmp_path):
    emu = await started(tmp_path, [{"kind": "slow", "endpoint": "POST /bundles/",
                                    "delay_s": 1.0, "count": 1}])
    try:
        async with fast_client(emu, timeout_s=0.3) as vast:
            assert await vast.search_offers(limit=1)
        assert emu.request_count("POST /bundles/") == 2
    finally:
        await emu.stop()


async def test_pacing_avoids_rate_limit(tmp_path, caplog):
    emu = await started(tmp_path, [], rate_limits={"POST /bundles/": 0.3})
    try:
        async with fast_client(emu, max_attempts=1,
                               min_interval_s={"POST /bundles/": 0.3}) as vast:
            for _ in range(3):
                assert await vast.search_offers(limit=1)
        assert emu.request_count("POST /bundles/") == 3
        assert retry_warnings(caplog) == []
    finally:
        await emu.stop()


async def test_no_pacing_trips_rate_limit(tmp_path):
    emu = await started(tmp_path, [], rate_limits={"POST /bundles/": 30.0})
    try:
        async with fast_client(emu, max_attempts=1) as vast:
            await vast.search_offers(limit=1)
            with pytest.raises(errors.RateLimited):
                await vast.search_offers(limit=1)
    finally:
        await emu.stop()
