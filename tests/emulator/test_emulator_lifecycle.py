"""Instance lifecycle with real processes and signals: run, exit, preempt, stop, destroy."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gpujobs.emulator import Emulator

from emu_helpers import cheap_offer, client_for, wait_for, wait_for_status

TRAP_SIGTERM = """
import os, signal, sys, time
out = sys.argv[1]
def on_term(signum, frame):
    open(os.path.join(out, "sigterm"), "w").write("got SIGTERM")
    sys.exit(0)
signal.signal(signal.SIGTERM, {handler})
open(os.path.join(out, "pid"), "w").write(str(os.getpid()))
while True:
    time.sleep(0.05)
"""


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def is_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def start_trap(vast, tmp_path, handler="on_term"):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    path = script(tmp_path, "trap.py", TRAP_SIGTERM.replace("{handler}", handler))
    instance_id = await vast.create_instance(await cheap_offer(vast), image="python:3.11",
                                             onstart=f"exec python {path} {out}")
    await wait_for(lambda: (out / "pid").exists())
    return instance_id, out, int((out / "pid").read_text())


async def test_create_loading_running_exited(tmp_path, monkeypatch):
    monkeypatch.setenv("VAST_API_KEY", "must-not-leak")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "must-not-leak-either")
    emu = Emulator(seed=2, loading_s=1.0, rate_limits=False, workdir=tmp_path / "emu")
    await emu.start()
    out = tmp_path / "env.json"
    body = f"""
        import json, os, sys, time
        time.sleep(0.5)
        json.dump({{"env": dict(os.environ), "python": sys.executable}}, open({str(out)!r}, "w"))
        print("finished work")
        sys.exit(3)
    """
    path = script(tmp_path, "work.py", body)
    try:
        async with client_for(emu) as vast:
            instance_id = await vast.create_instance(
                await cheap_offer(vast), image="python:3.11", onstart=f"python {path}",
                env={"FOO": "bar", "-p 8080:8080": "1"}, label="life")
            first = await vast.show_instance(instance_id)
            assert first.actual_status in (None, "loading")
            await wait_for_status(vast, instance_id, "loading")
            running = await wait_for_status(vast, instance_id, "running")
            assert "22/tcp" in running.ports
            assert "8080/tcp" in running.ports
            exited = await wait_for_status(vast, instance_id, "exited")
            assert "code 3" in exited.status_msg
            assert "finished work" in await vast.request_logs(instance_id, poll_interval_s=0.1)
    finally:
        await emu.stop()

    recorded = json.loads(out.read_text())
    env = recorded["env"]
    assert env["CONTAINER_ID"] == f"C.{instance_id}"
    assert env["VAST_CONTAINERLABEL"] == f"C.{instance_id}"
    assert env["FOO"] == "bar"
    assert "VAST_API_KEY" not in env
    assert "MY_SERVICE_TOKEN" not in env
    assert "-p 8080:8080" not in env
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)


async def test_args_runtype_runs_argv(vast, tmp_path):
    marker = tmp_path / "args-marker"
    instance_id = await vast.create_instance(
        await cheap_offer(vast), image="python:3.11",
        args=["python", "-c", f"open({str(marker)!r}, 'w').write('args ran')"])
    await wait_for_status(vast, instance_id, "exited")
    assert marker.read_text() == "args ran"
    inst = await vast.show_instance(instance_id)
    assert "code 0" in inst.status_msg


async def test_no_command_stays_running(vast):
    instance_id = await vast.create_instance(await cheap_offer(vast), image="busybox")
    await wait_for_status(vast, instance_id, "running")
    await asyncio.sleep(0.5)
    assert (await vast.show_instance(instance_id)).actual_status == "running"


async def test_preempt_sigterm_with_grace(emulator, vast, tmp_path):
    instance_id, out, pid = await start_trap(vast, tmp_path)
    await emulator.preempt(instance_id, sigterm=True, grace_s=3.0)
    assert (out / "sigterm").read_text() == "got SIGTERM"
    assert not is_alive(pid)
    inst = await vast.show_instance(instance_id)
    assert inst.actual_status == "stopped"
    assert inst.intended_status == inst.cur_state == inst.next_state == "stopped"
    assert inst.is_outbid
    assert instance_id in [item.id for item in await vast.list_instances()]


async def test_preempt_hard_kill_sends_no_sigterm(emulator, vast, tmp_path):
    instance_id, out, pid = await start_trap(vast, tmp_path)
    await emulator.preempt(instance_id, sigterm=False)
    assert not (out / "sigterm").exists()
    assert not is_alive(pid)
    assert (await vast.show_instance(instance_id)).is_outbid


async def test_preempt_kills_after_grace_when_ignored(emulator, vast, tmp_path):
    instance_id, out, pid = await start_trap(vast, tmp_path, handler="signal.SIG_IGN")
    await emulator.preempt(instance_id, sigterm=True, grace_s=0.3)
    assert not (out / "sigterm").exists()
    assert not is_alive(pid)


async def test_billing_grows_then_gpu_part_stops(emulator, vast, tmp_path):
    instance_id, _, _ = await start_trap(vast, tmp_path)
    first = emulator.ledger()[0]["cost_usd"]
    await wait_for(lambda: emulator.ledger()[0]["cost_usd"] > first)

    await emulator.preempt(instance_id, sigterm=False)
    now = time.time()
    before = (await vast.charges(start=now - 60, end=now + 60))[0]
    await wait_for(lambda: emulator.ledger()[0]["cost_usd"] > before["amount"] + 1e-6)
    after = (await vast.charges(start=now - 60, end=now + 60))[0]
    gpu = {charge["type"]: charge["amount"] for charge in after["items"]}
    gpu_before = {charge["type"]: charge["amount"] for charge in before["items"]}
    assert gpu["gpu"] == gpu_before["gpu"]
    assert gpu["disk"] > gpu_before["disk"]
    assert after["source"] == f"instance-{instance_id}"
    assert emulator.total_charges_usd() == pytest.approx(
        sum(entry["cost_usd"] for entry in emulator.ledger()), rel=1e-3)


async def test_destroy_kills_process_group(emulator, vast, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    path = script(tmp_path, "parent.py", f"""
        import os, subprocess, time
        child = subprocess.Popen(["sleep", "300"])
        open(os.path.join({str(out)!r}, "pids"), "w").write(f"{{os.getpid()}} {{child.pid}}")
        time.sleep(300)
    """)
    instance_id = await vast.create_instance(await cheap_offer(vast), image="python:3.11",
                                             onstart=f"python {path}")
    await wait_for(lambda: (out / "pids").exists())
    pids = [int(pid) for pid in (out / "pids").read_text().split()]
    assert all(is_alive(pid) for pid in pids)

    await vast.destroy_instance(instance_id)
    await wait_for(lambda: not any(is_alive(pid) for pid in pids))
    assert await vast.show_instance(instance_id) is None
    assert instance_id not in emulator.live_instance_ids()
    entry = emulator.ledger()[0]
    assert entry["status"] == "destroyed"
    assert entry["destroyed_at"] is not None
    cost = entry["cost_usd"]
    await asyncio.sleep(0.2)
    assert emulator.ledger()[0]["cost_usd"] == cost


async def test_stop_then_start_runs_again(vast, tmp_path):
    runs = tmp_path / "runs"
    instance_id = await vast.create_instance(
        await cheap_offer(vast), image="python:3.11",
        onstart=f"echo run >> {runs}; exec sleep 300")
    await wait_for(lambda: runs.exists())
    await vast.stop_instance(instance_id)
    stopped = await wait_for_status(vast, instance_id, "stopped")
    assert stopped.is_outbid
    await vast.start_instance(instance_id)
    await wait_for_status(vast, instance_id, "running")
    await wait_for(lambda: runs.read_text().count("run") == 2)
    assert (await vast.show_instance(instance_id)).intended_status == "running"


async def test_set_offline(emulator, vast, tmp_path):
    instance_id, _, pid = await start_trap(vast, tmp_path)
    await emulator.set_offline(instance_id)
    inst = await vast.show_instance(instance_id)
    assert inst.actual_status == "offline"
    assert inst.intended_status == "running"
    assert not is_alive(pid)


async def test_bid_instance_and_change_bid(vast):
    offers = await vast.search_offers("gpu_name=RTX_4090 num_gpus=1", offer_type="bid", limit=1)
    bid = round(offers[0].min_bid + 0.01, 4)
    instance_id = await vast.create_instance(offers[0].id, image="busybox", price=bid)
    inst = await wait_for_status(vast, instance_id, "running")
    assert inst.is_bid is True
    assert inst.dph_total == pytest.approx(bid, abs=0.01)
    await vast.change_bid(instance_id, bid + 0.5)
    assert (await vast.show_instance(instance_id)).dph_total == pytest.approx(bid + 0.5, abs=0.01)


async def test_low_bid_resumes_after_change_bid(vast):
    from gpujobs.vast import errors
    offers = await vast.search_offers("gpu_name=RTX_4090 num_gpus=1", offer_type="bid", limit=1)
    with pytest.raises(errors.BidTooLow) as caught:
        await vast.create_instance(offers[0].id, image="busybox", price=0.001)
    await vast.change_bid(caught.value.instance_id, offers[0].min_bid + 0.01)
    await wait_for_status(vast, caught.value.instance_id, "running")


async def test_destroyed_machine_relisted(emulator, vast):
    offer = (await vast.search_offers("gpu_name=RTX_4090 num_gpus=1", order="dph", limit=1))[0]
    instance_id = await vast.create_instance(offer.id, image="busybox")
    assert offer.id not in emulator.market.offers
    await vast.destroy_instance(instance_id)
    relisted = [o for o in emulator.market.offers.values() if o["machine_id"] == offer.machine_id]
    assert len(relisted) == 1
    assert relisted[0]["id"] != offer.id


async def test_stop_kills_everything_and_is_idempotent(tmp_path):
    emu = Emulator(seed=4, loading_s=0.1, rate_limits=False, workdir=tmp_path / "emu")
    await emu.start()
    async with client_for(emu) as vast:
        instance_id, _, pid = await start_trap(vast, tmp_path)
    assert instance_id in emu.live_instance_ids()
    await emu.stop()
    await emu.stop()
    assert not is_alive(pid)


async def test_stop_marks_intended_at_once(emulator, vast, tmp_path):
    instance_id, _, pid = await start_trap(vast, tmp_path, handler="signal.SIG_IGN")
    await vast.stop_instance(instance_id)
    stopping = await vast.show_instance(instance_id)
    assert stopping.intended_status == "stopped"
    assert stopping.next_state == "stopped"
    stopped = await wait_for_status(vast, instance_id, "stopped")
    assert stopped.cur_state == "stopped"
    assert not is_alive(pid)


async def test_preempt_during_loading_never_starts(tmp_path):
    emu = Emulator(seed=6, loading_s=1.0, rate_limits=False, workdir=tmp_path / "emu")
    await emu.start()
    marker = tmp_path / "started"
    try:
        async with client_for(emu) as vast:
            instance_id = await vast.create_instance(await cheap_offer(vast), image="busybox",
                                                     onstart=f"touch {marker}")
            await emu.preempt(instance_id, sigterm=False)
            await asyncio.sleep(1.3)
            inst = await vast.show_instance(instance_id)
            assert inst.actual_status == "stopped"
            assert inst.is_outbid
            assert not marker.exists()
    finally:
        await emu.stop()
