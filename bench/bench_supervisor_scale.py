"""Supervisor cost per tick with thousands of running jobs against the emulator.

The emulator runs in its own process (so its work is not counted), with instances that run no
command; the workers' heartbeats are fed to the supervisor's report handler in-process between
ticks. The ramp-up rents every instance with the client's pacing off, since the API's create
limit (one per 4.5 s) would make it take hours. The steady ticks then run on the default
settings (cost every 60 s, at most 20 periodic bills per second, heartbeat timeout 60 s), one
every `tick_s` seconds of real time, with the client paced to the API's real per-endpoint
limits. No periodic bill is written before the steady ticks, so within their first minute every
job is due for one, as in a long run at this scale where bills lag: each tick then writes its
full share of bills. Measured per steady tick: the CPU time of the supervisor process (every
thread) for the tick, and apart for the heartbeats handled before it. Also per tick: wall time,
API calls, jobs that needed a step and events journaled. Last, the resident memory of the
process, and the garbage collector's full collections during the steady ticks (how many, the
maximum CPU time of one on the thread that ran it) with the objects it tracks afterwards, and
the best of three full collections run on demand after the ticks. Objects alive after the
supervisor's start are frozen first, as the supervise command does.

    python bench/bench_supervisor_scale.py --jobs 10000 1000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpujobs import events as ev
from gpujobs.jobspec import JobSpec
from gpujobs.limits import Limits
from gpujobs.profiles import Profile, gpu_names_for
from gpujobs.settings import load_settings
from gpujobs.supervisor.core import Supervisor, freeze_startup_objects
from gpujobs.supervisor.reporting import handle_report
from gpujobs.vast.client import VastClient
from gpujobs.vast.transport import DEFAULT_MIN_INTERVAL_S
from worker.protocol import Report, ReportKind

EMULATOR_SCRIPT = """
import asyncio, signal, sys
from gpujobs.emulator import Emulator
async def main():
    emulator = Emulator(seed=1, api_key="bench-key", loading_s=0.0, rate_limits=False,
                        offers_per_gpu=int(sys.argv[1]), workdir=__import__("pathlib").Path(sys.argv[2]))
    url = await emulator.start()
    print(url, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await emulator.stop()
asyncio.run(main())
"""


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class CountingClient(VastClient):
    calls = 0

    async def _call(self, method, path, **kwargs):  # type: ignore[no-untyped-def]
        CountingClient.calls += 1
        return await super()._call(method, path, **kwargs)


class FullCollections:
    """Count and time the collector's full (oldest generation) collections while enabled."""

    def __init__(self) -> None:
        self.enabled = False
        self.seconds: list[float] = []
        self._started = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if not self.enabled or info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.thread_time()
        else:
            self.seconds.append(time.thread_time() - self._started)


def bench_profile() -> Profile:
    return Profile(name="bench", gpu_names=gpu_names_for("RTX"), num_gpus=1, max_dph=100.0,
                   reliability_min=0.0, max_duration_hours=1000.0)


async def submit_all(sup: Supervisor, count: int) -> list[str]:
    profile = bench_profile()
    spec = JobSpec(name="bench", profile="bench", command="", total_steps=10**9).to_dict()
    job_ids = [f"bench-{i:05d}" for i in range(count)]

    async def one(job_id: str) -> None:
        event = ev.JobSubmitted(job_id=job_id, name="bench", team="t", project="p",
                                profile_name="bench", profile=profile.to_dict(), spec=spec)
        await sup.store.append(job_id, [event.to_new_event()], expected_version=0)

    for start in range(0, count, 500):
        await asyncio.gather(*(one(j) for j in job_ids[start:start + 500]))
    await sup.table.catch_up()
    return job_ids


async def heartbeat_all(sup: Supervisor, job_ids: list[str], step: int,
                        kind: ReportKind) -> None:
    for job_id in job_ids:
        job = sup.table.jobs[job_id]
        if job["state"] not in ("provisioning", "running"):
            continue
        await handle_report(sup, Report(job_id=job_id, attempt=int(job["attempt"]), kind=kind,
                                        step=step, total_steps=10**9, sent_at=time.time()))


async def run_case(jobs: int, steady_ticks: int) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="gpujobs-scale-"))
    emulator = subprocess.Popen(
        # The bench profile matches about 1.3 offers per unit of offers_per_gpu (3,078 at
        # 2,400, 9,413 at 7,300), so jobs + 500 leaves an offer for every job.
        [sys.executable, "-c", EMULATOR_SCRIPT, str(jobs + 500), str(home / "emu")],
        stdout=subprocess.PIPE, text=True,
    )
    url = emulator.stdout.readline().strip()  # type: ignore[union-attr]
    settings = load_settings(home=home).replace(sweep_pages_per_tick=4, offer_search_limit=2000)
    # No periodic bills before the steady ticks, so that every job is unbilled since its
    # creation, as in a long run where bills lag behind. Every steady tick then writes its full
    # share of bills, not the few left over from the ramp-up.
    unbilled = settings.replace(cost_interval_s=1e9)
    client = CountingClient(api_key="bench-key", base_url=url,
                            min_interval_s={k: 0.0 for k in DEFAULT_MIN_INTERVAL_S})
    paced = CountingClient(api_key="bench-key", base_url=url,
                           min_interval_s=DEFAULT_MIN_INTERVAL_S)
    sup = Supervisor(unbilled, client)
    sup.limits = Limits()  # the shipped limits.yaml caps instances far below this scale
    collections = FullCollections()
    gc.callbacks.append(collections)
    try:
        await sup.start()
        frozen = freeze_startup_objects()  # as the supervise command does after start
        rss_empty = rss_mib()
        job_ids = await submit_all(sup, jobs)
        ramp_started = time.monotonic()
        while sum(1 for j in job_ids if sup.table.jobs[j]["instance_id"]) < jobs:
            await sup.tick()
            for job_id in job_ids:  # offers ran out this tick: no backoff in a benchmark
                sup.table.runtime_for(job_id).backoff_until = 0.0
            if time.monotonic() - ramp_started > 900:
                raise TimeoutError("ramp-up took more than 15 minutes")
        await heartbeat_all(sup, job_ids, 1, ReportKind.STARTED)
        ramp_s = time.monotonic() - ramp_started
        # Steady state: one full sweep of the instance list after every job was running.
        sweeps = sup.instances.sweeps_completed
        warm_ticks = 0
        while sup.instances.sweeps_completed < sweeps + 1:
            await heartbeat_all(sup, job_ids, 1, ReportKind.HEARTBEAT)
            await sup.tick()
            warm_ticks += 1
        sup.client = paced  # from here on, every request waits for the API's real limits
        sup.settings = settings
        cpu, heartbeat_cpu, wall, calls, stepped, journaled = [], [], [], [], [], []
        next_tick = time.monotonic()
        collections.enabled = True
        for tick in range(steady_ticks):
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
            next_tick = time.monotonic() + settings.tick_s
            cpu_start = time.process_time()
            await heartbeat_all(sup, job_ids, 2 + tick, ReportKind.HEARTBEAT)
            heartbeat_cpu.append(time.process_time() - cpu_start)
            before_calls, before_events = CountingClient.calls, sup.store.stats.events
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            await sup.tick()
            cpu.append(time.process_time() - cpu_start)
            wall.append(time.perf_counter() - wall_start)
            calls.append(CountingClient.calls - before_calls)
            stepped.append(sup.jobs_stepped_last_tick)
            journaled.append(sup.store.stats.events - before_events)
        collections.enabled = False
        gc.collect()
        tracked = len(gc.get_objects())
        full_collection_s = []  # one full collection on demand, away from any tick's work
        for _ in range(3):
            started = time.thread_time()
            gc.collect()
            full_collection_s.append(time.thread_time() - started)
        running = sum(1 for j in job_ids if sup.table.jobs[j]["state"] == "running")
        return {
            "jobs": jobs, "running": running, "ramp_s": ramp_s,
            "cpu_ms_per_tick": statistics.median(cpu) * 1000,
            "cpu_ms_mean": statistics.mean(cpu) * 1000,
            "cpu_ms_max": max(cpu) * 1000,
            "cpu_ms_ticks": [round(c * 1000, 1) for c in cpu],
            "heartbeat_cpu_ms_per_tick": statistics.median(heartbeat_cpu) * 1000,
            "wall_ms_per_tick": statistics.median(wall) * 1000,
            "api_calls_per_tick": statistics.median(calls),
            "jobs_stepped_per_tick": statistics.median(stepped),
            "events_per_tick": statistics.mean(journaled),
            "rss_mib": rss_mib(), "rss_empty_mib": rss_empty,
            "sweep_ticks": warm_ticks,
            "full_collections": len(collections.seconds),
            "full_collection_ms_max": max(collections.seconds, default=0.0) * 1000,
            "objects_tracked": tracked, "objects_frozen": frozen,
            "full_collection_ms_after": min(full_collection_s) * 1000,
        }
    finally:
        gc.callbacks.remove(collections)
        gc.unfreeze()
        await sup.stop()
        await client.close()
        await paced.close()
        emulator.terminate()
        emulator.wait(timeout=60)
        shutil.rmtree(home, ignore_errors=True)  # about 75 MB of journal and emulator files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1000, 10000])
    # 13 ticks of 5 s span one cost interval (60 s), so every job comes due for a bill.
    parser.add_argument("--ticks", type=int, default=13)
    args = parser.parse_args()
    results = [asyncio.run(run_case(n, args.ticks)) for n in args.jobs]
    print("| jobs running | CPU ms/tick (median, mean, max) | heartbeats CPU ms/tick "
          "| wall ms/tick, paced | API calls/tick | jobs stepped/tick | events journaled/tick "
          "| RSS MiB (before jobs) | ramp-up s, unpaced | ticks per full sweep "
          "| full collections (max ms) | objects tracked (frozen) | full collection after, ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['running']:,} | {r['cpu_ms_per_tick']:.1f}, {r['cpu_ms_mean']:.1f}, "
              f"{r['cpu_ms_max']:.1f} "
              f"| {r['heartbeat_cpu_ms_per_tick']:.1f} "
              f"| {r['wall_ms_per_tick']:.1f} | {r['api_calls_per_tick']:.0f} "
              f"| {r['jobs_stepped_per_tick']:.0f} | {r['events_per_tick']:.0f} | {r['rss_mib']:.0f} "
              f"({r['rss_empty_mib']:.0f}) | {r['ramp_s']:.0f} | {r['sweep_ticks']} "
              f"| {r['full_collections']} ({r['full_collection_ms_max']:.1f}) "
              f"| {r['objects_tracked']:,} ({r['objects_frozen']:,}) "
              f"| {r['full_collection_ms_after']:.1f} |")
    print(json.dumps(results), file=sys.stderr)
    os.environ.pop("GPUJOBS_HOME", None)


if __name__ == "__main__":
    main()
