"""The time scale speeds up every emulated delay, not only billing.

Each test sets a delay of one emulated hour at 3600 emulated seconds per real second, so
it lasts one real second. Without the scaling, the wait would last an hour and time out.
"""

from __future__ import annotations

import pytest

from gpujobs.emulator import Emulator, EmulatorError, FaultPlan
from gpujobs.emulator.container import read_tail

from emu_helpers import cheap_offer, client_for, wait_for, wait_for_status

HOUR_S = 3600.0
SCALE = 3600.0


async def started(tmp_path, rules=(), **options) -> Emulator:
    options.setdefault("loading_s", 36.0)
    emu = Emulator(seed=17, time_scale=SCALE, rate_limits=False, workdir=tmp_path / "emu",
                   faults=FaultPlan.from_data(list(rules)), **options)
    await emu.start()
    return emu


async def test_loading_follows_time_scale(tmp_path):
    emu = await started(tmp_path, loading_s=HOUR_S)
    try:
        async with client_for(emu) as vast:
            instance_id = await vast.create_instance(await cheap_offer(vast), image="busybox")
            running = await wait_for_status(vast, instance_id, "running", timeout_s=30)
        assert running.actual_status == "running"
    finally:
        await emu.stop()


async def test_fault_delay_follows_time_scale(tmp_path):
    emu = await started(tmp_path, [{"kind": "preempt", "after_s": HOUR_S, "sigterm": False,
                                    "instance": "first"}])
    try:
        async with client_for(emu) as vast:
            instance_id = await vast.create_instance(await cheap_offer(vast), image="busybox",
                                                     onstart="exec sleep 60")
            await wait_for_status(vast, instance_id, "running")
            outbid = await wait_for_status(vast, instance_id, "stopped", timeout_s=30)
        assert outbid.is_outbid
    finally:
        await emu.stop()


async def test_grace_follows_time_scale(tmp_path):
    # The command ignores SIGTERM, so only the SIGKILL at the end of the grace stops it. The
    # preemption waits two real seconds, so that the shell has set its trap on a busy machine.
    emu = await started(tmp_path, [{"kind": "preempt", "after_s": 2 * HOUR_S, "sigterm": True,
                                    "grace_s": HOUR_S, "instance": "first"}])
    try:
        async with client_for(emu) as vast:
            instance_id = await vast.create_instance(
                await cheap_offer(vast), image="busybox",
                onstart="trap 'echo got-sigterm' TERM; while true; do sleep 0.05; done")
            outbid = await wait_for_status(vast, instance_id, "stopped", timeout_s=30)
        assert outbid.is_outbid
        inst = emu.fleet.get_live(instance_id)
        assert inst.process is None
        assert "got-sigterm" in inst.log_path.read_text()
    finally:
        await emu.stop()


async def test_log_readiness_follows_time_scale(tmp_path):
    emu = await started(tmp_path, logs_ready_s=HOUR_S)
    try:
        async with client_for(emu) as vast:
            instance_id = await vast.create_instance(await cheap_offer(vast), image="busybox",
                                                     onstart="echo scaled-log; sleep 60")
            await wait_for_status(vast, instance_id, "running")
            log_path = emu.fleet.get_live(instance_id).log_path
            await wait_for(lambda: "scaled-log" in read_tail(log_path, 10))
            text = await vast.request_logs(instance_id, poll_interval_s=0.2, max_polls=100)
        assert "scaled-log" in text
    finally:
        await emu.stop()


def test_time_scale_must_be_positive(tmp_path):
    with pytest.raises(EmulatorError, match="time_scale must be > 0"):
        Emulator(time_scale=0.0, workdir=tmp_path / "emu")
