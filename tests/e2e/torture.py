"""Crash torture: SIGKILL the real `gpujobs supervise` process at random moments, then check.

The emulator runs in the caller's event loop, so the workers (children of the emulator) outlive
every supervisor kill. A seeded random schedule decides when each kill lands: after a random
pause, or while a create or destroy call is in flight at the emulator. Both endpoints are slowed
down, so that kills fall between an intent and its outcome. Meanwhile a chaos task preempts
instances (with and without SIGTERM), takes hosts offline and injects 429 and 5xx bursts.

`run_torture` returns a `TortureReport`; its `violations()` lists every broken invariant.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from gpujobs.emulator import Emulator, FaultPlan
from gpujobs.projections import LIVE_ATTEMPT_STATUSES, parse_label
from gpujobs.vast.transport import endpoint_key

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
CREATE_ENDPOINT = "PUT /asks/{id}/"
DESTROY_ENDPOINT = "DELETE /instances/{id}/"
TERMINAL = ("done", "failed", "cancelled")

# A wider profile than dev-test: the default market has only 10 dev-test offers on 2 hosts, and
# the supervisor never reuses a host that lost an attempt of the same job.
TORTURE_PROFILE = {
    "gpu_name": "RTX_4090", "num_gpus": 1, "max_dph": 1.0, "reliability_min": 0.9,
    "max_duration_hours": 2, "interruptible": False,
}


@dataclass(frozen=True)
class TortureConfig:
    """One torture run. Times are real seconds, and `seed` fixes every random choice."""

    seed: int = 0
    kills: int = 10
    jobs: int = 3
    max_jobs_in_flight: int = 3
    total_steps: tuple[int, int] = (150, 300)
    step_delay_s: float = 0.01
    checkpoint_every: int = 25
    cancel_fraction: float = 0.0  # share of jobs cancelled while they run
    tick_s: float = 0.3
    kill_gap_s: tuple[float, float] = (0.3, 3.0)
    down_s: tuple[float, float] = (0.0, 0.5)  # pause between a kill and the restart
    targeted_kill_share: float = 0.4  # kills that wait for a create or destroy in flight
    create_delay_s: float = 0.5  # before the emulator creates the instance
    create_reply_delay_s: float = 1.0  # after it created the instance, before it replies
    destroy_delay_s: float = 0.4
    chaos_gap_s: tuple[float, float] = (2.0, 6.0)  # pause between two instance faults
    chaos: bool = True
    chaos_max_attempt: int = 2  # preempt only attempts up to this number, so jobs can finish
    offer_vanish_probability: float = 0.1
    offers_per_gpu: int = 40
    loading_s: float = 0.5
    sample_interval_s: float = 0.05
    settle_timeout_s: float = 240.0
    stall_s: float = 90.0  # a job this long without events stops counting as in flight
    cost_tolerance: float = 0.01
    snapshot: bool = False  # run the children on a copy of the packages taken at the start


@dataclass(frozen=True)
class InstanceCost:
    """One instance's bill from the emulator against the CostAccrued events for it."""

    instance_id: int
    label: str
    emulator_usd: float
    journal_usd: float  # every CostAccrued, the settling one included
    created_at: float | None = None  # emulator lifetime
    destroyed_at: float | None = None
    billed_from: float | None = None  # span that the CostAccrued events cover
    billed_through: float | None = None
    estimate_usd: float = 0.0  # what the supervisor billed before the charges settled it
    settled: bool = False

    @property
    def start_lag_s(self) -> float:
        """Seconds from the emulator's create to the start of the supervisor's billing."""
        if self.created_at is None or self.billed_from is None:
            return 0.0
        return self.billed_from - self.created_at

    @property
    def end_lag_s(self) -> float:
        """Seconds the supervisor billed past the emulator's destroy (negative: short)."""
        if self.destroyed_at is None or self.billed_through is None:
            return 0.0
        return self.billed_through - self.destroyed_at

    @property
    def gap(self) -> float:
        """Relative gap of the journal's cost against the emulator's bill."""
        return 0.0 if self.emulator_usd == 0 else (
            (self.journal_usd - self.emulator_usd) / self.emulator_usd)


@dataclass(frozen=True)
class TortureReport:
    config: TortureConfig
    kills: int
    kill_modes: dict[str, int]
    supervisor_exits: list[str]  # supervisor processes that ended before they were killed
    submit_failures: list[str]
    duration_s: float
    jobs: dict[str, str]  # job id -> final state
    expected: dict[str, tuple[str, ...]]  # job id -> acceptable final states
    instances: int
    samples: int
    max_live_per_job: int
    doubled_samples: list[str]
    overlaps: list[str]
    live_at_end: list[int]
    unknown_labels: list[str]
    early_destroy_records: list[str]
    audit_output: str
    audit_ok: bool
    replay_output: str
    replay_ok: bool
    costs: list[InstanceCost]
    chaos_events: dict[str, int]
    journal_events: dict[str, int]  # count per event type, plus "adopted" InstanceCreated
    home: str

    @property
    def emulator_total_usd(self) -> float:
        return sum(c.emulator_usd for c in self.costs)

    @property
    def journal_total_usd(self) -> float:
        return sum(c.journal_usd for c in self.costs)

    @property
    def cost_gap(self) -> float:
        total = self.emulator_total_usd
        return 0.0 if total == 0 else (self.journal_total_usd - total) / total

    @property
    def estimate_gap(self) -> float:
        """The gap before settlement: how well the supervisor's own billing did."""
        total = self.emulator_total_usd
        estimate = sum(c.estimate_usd for c in self.costs)
        return 0.0 if total == 0 else (estimate - total) / total

    def violations(self) -> list[str]:
        """Describe every broken invariant; an empty list means the run passed."""
        found = [f"supervisor exited on its own: {text}" for text in self.supervisor_exits]
        found += [f"submit failed: {text}" for text in self.submit_failures]
        for job_id, state in sorted(self.jobs.items()):
            if state not in self.expected.get(job_id, ("done",)):
                found.append(f"job {job_id} ended {state}, expected "
                             f"{'/'.join(self.expected.get(job_id, ('done',)))}")
        found += [f"doubled instance: {text}" for text in self.doubled_samples[:10]]
        found += [f"overlapping instances: {text}" for text in self.overlaps]
        found += [f"instance {i} still alive at the end" for i in self.live_at_end]
        found += [f"unknown label {text}" for text in self.unknown_labels]
        found += [f"destroy recorded early: {text}" for text in self.early_destroy_records]
        if not self.audit_ok:
            found.append(f"audit verify failed: {self.audit_output}")
        if not self.replay_ok:
            found.append(f"replay --all --check failed: {self.replay_output}")
        if abs(self.cost_gap) > self.config.cost_tolerance:
            found.append(f"journal cost ${self.journal_total_usd:.6f} differs from the "
                         f"emulator's ${self.emulator_total_usd:.6f} by {self.cost_gap:+.2%}")
        return found

    def summary(self) -> dict[str, Any]:
        gaps = [c.gap for c in self.costs if c.emulator_usd > 0]
        return {
            "seed": self.config.seed, "kills": self.kills, "kill_modes": self.kill_modes,
            "jobs": len(self.jobs), "final_states": dict(Counter(self.jobs.values())),
            "instances": self.instances, "duration_s": round(self.duration_s, 1),
            "samples": self.samples, "max_live_per_job": self.max_live_per_job,
            "chaos": self.chaos_events, "journal_events": self.journal_events,
            "emulator_usd": round(self.emulator_total_usd, 6),
            "journal_usd": round(self.journal_total_usd, 6),
            "cost_gap": round(self.cost_gap, 5),
            "estimate_gap": round(self.estimate_gap, 5),
            "unsettled_instances": sum(1 for c in self.costs if not c.settled),
            "max_instance_gap": round(max(gaps, key=abs), 5) if gaps else 0.0,
            "mean_start_lag_s": round(_mean([c.start_lag_s for c in self.costs]), 3),
            "mean_end_lag_s": round(_mean([c.end_lag_s for c in self.costs]), 3),
            "billed_past_destroy_1s": sum(1 for c in self.costs if c.end_lag_s > 1.0),
            "violations": self.violations(), "home": self.home,
        }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class TortureEmulator(Emulator):
    """The emulator, with a pause after chosen endpoints have acted and before they reply.

    The emulator's own ``slow`` fault waits before the handler runs, so a kill in that pause
    means the create never happened. The pause here lands a kill after the instance exists but
    before the supervisor could record the outcome.
    """

    def __init__(self, *, reply_delays_s: dict[str, float], **options: Any) -> None:
        super().__init__(**options)
        self.reply_delays_s = reply_delays_s

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response = await super()._middleware(request, handler)
        delay_s = self.reply_delays_s.get(endpoint_key(request.method, request.path), 0.0)
        if delay_s and response.status < 400:
            await asyncio.sleep(delay_s)
        return response


class SupervisorProcess:
    """`python -m gpujobs.cli supervise` as a child process, its output appended to one log."""

    def __init__(self, env: dict[str, str], tick_s: float, log_path: Path) -> None:
        self.env = env
        self.tick_s = tick_s
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self.generation = 0

    async def start(self) -> None:
        self.generation += 1
        with self.log_path.open("ab") as out:
            out.write(f"--- supervisor start {self.generation} at {time.time():.3f}\n".encode())
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gpujobs.cli", "supervise", "--tick-s", str(self.tick_s),
                "--pacing-scale", "0", "--intent-timeout-s", "10", "--settle-delay-s", "0",
                "--settle-interval-s", "1", env=self.env,
                stdout=out, stderr=out, stdin=asyncio.subprocess.DEVNULL,
                cwd=self.env["PYTHONPATH"],
            )

    def exited_early(self) -> str | None:
        """Describe the process if it ended without being killed."""
        if self.process is None or self.process.returncode is None:
            return None
        return f"generation {self.generation} exited with code {self.process.returncode}"

    async def kill(self) -> None:
        assert self.process is not None
        if self.process.returncode is None:
            os.kill(self.process.pid, signal.SIGKILL)
        await self.process.wait()

    async def stop(self, timeout_s: float = 20.0) -> int | None:
        """Stop it with SIGTERM, or SIGKILL after `timeout_s`, and return the exit code."""
        if self.process is None or self.process.returncode is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), timeout_s)
        except TimeoutError:
            await self.kill()
            return self.process.returncode


class LiveSampler:
    """Counts the emulator's live instances per job, many times a second."""

    def __init__(self, emulator: Emulator, interval_s: float) -> None:
        self.emulator = emulator
        self.interval_s = interval_s
        self.samples = 0
        self.max_per_job = 0
        self.doubled: list[str] = []

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)

    def sample(self) -> None:
        self.samples += 1
        per_job: dict[str, list[int]] = {}
        for inst in self.emulator.fleet.live():
            key = parse_label(inst.label)
            if key is not None:
                per_job.setdefault(key[0], []).append(inst.id)
        for job_id, ids in per_job.items():
            self.max_per_job = max(self.max_per_job, len(ids))
            if len(ids) > 1 and len(self.doubled) < 100:
                self.doubled.append(f"job {job_id} had live instances {ids} at {time.time():.3f}")


class Chaos:
    """Seeded faults against running instances and API endpoints."""

    def __init__(self, emulator: Emulator, config: TortureConfig, rng: random.Random) -> None:
        self.emulator = emulator
        self.config = config
        self.rng = rng
        self.counts: Counter[str] = Counter()

    def http_plan(self) -> FaultPlan:
        """A fresh plan: slow create and destroy, vanishing offers, and a few random bursts."""
        rules: list[dict[str, Any]] = [
            {"kind": "slow", "endpoint": CREATE_ENDPOINT, "delay_s": self.config.create_delay_s},
            {"kind": "slow", "endpoint": DESTROY_ENDPOINT,
             "delay_s": self.config.destroy_delay_s},
        ]
        if self.config.offer_vanish_probability > 0:
            rules.append({"kind": "offer_vanishes",
                          "probability": self.config.offer_vanish_probability})
        if self.config.chaos:
            for endpoint in ("GET /api/v1/instances/", CREATE_ENDPOINT, DESTROY_ENDPOINT,
                             "GET /charges/"):
                kind = self.rng.choice(("burst_429", "burst_5xx", None))
                if kind is not None:
                    rules.append({"kind": kind, "endpoint": endpoint,
                                  "count": self.rng.randint(1, 3),
                                  "status": self.rng.choice((500, 502, 503))})
                    self.counts[f"{kind} {endpoint}"] += 1
        return FaultPlan.from_data(rules)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.rng.uniform(*self.config.chaos_gap_s))
            self.emulator.set_faults(self.http_plan())
            await self.hit_one_instance()

    async def hit_one_instance(self) -> None:
        targets = []
        for inst in self.emulator.fleet.live():
            key = parse_label(inst.label)
            if (key is not None and key[1] <= self.config.chaos_max_attempt
                    and inst.actual_status == "running"):
                targets.append(inst)
        if not targets:
            return
        target = self.rng.choice(sorted(targets, key=lambda inst: inst.id))
        action = self.rng.choice(("preempt_sigterm", "preempt_sigkill", "offline"))
        self.counts[action] += 1
        log.info("chaos: %s on instance %d (%s)", action, target.id, target.label)
        if action == "offline":
            await self.emulator.set_offline(target.id)
        else:
            # The grace period runs in the background, so kills can land inside it.
            self.emulator.background(self.emulator.preempt(
                target.id, sigterm=action == "preempt_sigterm", grace_s=2.0))


def write_config_dir(home: Path) -> Path:
    config_dir = home.parent / "torture-config"
    config_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump({"profiles": {"torture": TORTURE_PROFILE}})
    (config_dir / "gpu_profiles.yaml").write_text(text)
    return config_dir


def snapshot_source(dest: Path) -> Path:
    """Copy the packages that child processes import, so that edits to the working tree during
    a long run do not reach the supervisors and workers started later in it."""
    for name in ("gpujobs", "journal", "worker", "config"):
        shutil.copytree(REPO_ROOT / name, dest / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def child_env(home: Path, emulator: Emulator, config_dir: Path,
              source_root: Path = REPO_ROOT) -> dict[str, str]:
    """Environment of the supervisor and CLI processes; `PYTHONPATH` is also their cwd."""
    env = dict(os.environ)
    for name in ("GPUJOBS_ENV", "GPUJOBS_ARTIFACT_URI", "GPUJOBS_REPORT_MODE"):
        env.pop(name, None)
    env.update({"GPUJOBS_HOME": str(home), "VAST_URL": emulator.url,
                "VAST_API_KEY": emulator.api_key, "GPUJOBS_CONFIG_DIR": str(config_dir),
                "PYTHONPATH": str(source_root)})
    return env


async def run_cli(env: dict[str, str], *args: str, timeout_s: float = 60.0) -> tuple[int, str]:
    """Run one `gpujobs` command; return its exit code and its combined output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gpujobs.cli", *args, env=env, cwd=env["PYTHONPATH"],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        output, _ = await process.communicate()
        return 124, output.decode(errors="replace")
    return int(process.returncode or 0), output.decode(errors="replace").strip()


def read_journal(journal_path: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Run one query on the projections through a read-only connection."""
    if not journal_path.exists():
        return []
    conn = sqlite3.connect(f"file:{journal_path}?mode=ro", uri=True, timeout=30.0)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []  # the supervisor has not created the tables yet
    finally:
        conn.close()


def read_job_states(journal_path: Path) -> dict[str, str]:
    return dict(read_journal(journal_path, "SELECT job_id, state FROM jobs"))


def count_unsettled(journal_path: Path) -> int:
    """Destroyed instances whose cost no event has settled against the emulator's charges."""
    rows = read_journal(
        journal_path,
        "SELECT COUNT(*) FROM attempts WHERE status = 'destroyed' AND instance_id IS NOT NULL"
        " AND NOT EXISTS (SELECT 1 FROM events WHERE events.stream = attempts.job_id"
        " AND type = 'CostAccrued' AND json_extract(data, '$.attempt') = attempts.attempt"
        " AND json_extract(data, '$.settled_usd') IS NOT NULL)")
    return int(rows[0][0]) if rows else 0


def read_live_attempts(journal_path: Path) -> list[tuple]:
    """Attempts the journal still counts as live: requested, created or being destroyed."""
    return read_journal(journal_path, "SELECT job_id, attempt, status FROM attempts"
                        " WHERE status IN (?, ?, ?)", LIVE_ATTEMPT_STATUSES)


class JobFeeder:
    """Keeps `max_jobs_in_flight` jobs going through the CLI until `keep_submitting` is False."""

    def __init__(self, config: TortureConfig, env: dict[str, str], home: Path,
                 rng: random.Random) -> None:
        self.config = config
        self.env = env
        self.home = home
        self.rng = rng
        self.submitted: list[str] = []
        self.expected: dict[str, tuple[str, ...]] = {}
        self.to_cancel: set[str] = set()
        self.failures: list[str] = []
        self.keep_submitting = True

    def states(self) -> dict[str, str]:
        return read_job_states(self.home / "journal.db")

    def stalled(self) -> set[str]:
        """Jobs whose last event other than CostAccrued is older than `stall_s`."""
        rows = read_journal(self.home / "journal.db", "SELECT stream, MAX(recorded_at) FROM events"
                            " WHERE type != 'CostAccrued' GROUP BY stream")
        cutoff = time.time() - self.config.stall_s
        return {stream for stream, last_at in rows if last_at < cutoff}

    async def run(self) -> None:
        while True:
            states = await asyncio.to_thread(self.states)
            stalled = await asyncio.to_thread(self.stalled)
            await self.cancel_running(states)
            # A stalled job keeps its place in the final checks but not in the in-flight count,
            # so one stuck job does not stop the workload.
            in_flight = [j for j in self.submitted
                         if states.get(j) not in TERMINAL and j not in stalled]
            submitting = self.keep_submitting or len(self.submitted) < self.config.jobs
            if submitting and len(in_flight) < self.config.max_jobs_in_flight:
                await self.submit_one()
            await asyncio.sleep(0.3)

    async def submit_one(self) -> None:
        index = len(self.submitted) + len(self.failures)
        spec = {"name": f"t{index}", "profile": "torture",
                "total_steps": self.rng.randint(*self.config.total_steps),
                "checkpoint_every": self.config.checkpoint_every,
                "step_delay_s": self.config.step_delay_s, "heartbeat_interval_s": 0.3,
                "grace_period_s": 2.0, "seed": index}
        path = self.home.parent / "specs" / f"t{index}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(spec))
        code, output = await run_cli(self.env, "submit", str(path), "--json")
        if code != 0:
            self.failures.append(f"t{index}: exit {code}: {output[-300:]}")
            return
        job_id = yaml.safe_load(output)["job_id"]
        self.submitted.append(job_id)
        self.expected[job_id] = ("done",)
        if self.rng.random() < self.config.cancel_fraction:
            self.to_cancel.add(job_id)
            self.expected[job_id] = ("cancelled", "done")  # the job may finish first

    async def cancel_running(self, states: dict[str, str]) -> None:
        for job_id in sorted(self.to_cancel):
            if states.get(job_id) in TERMINAL:
                self.to_cancel.discard(job_id)  # it ended before it was seen running
            elif states.get(job_id) in ("running", "checkpointing", "resumed"):
                self.to_cancel.discard(job_id)
                code, output = await run_cli(self.env, "cancel", job_id)
                if code != 0:
                    self.failures.append(f"cancel {job_id}: exit {code}: {output[-300:]}")

    def settled(self) -> bool:
        """True once every job ended and the journal has no live attempt left."""
        states = self.states()
        return (len(self.submitted) >= self.config.jobs and not self.to_cancel
                and all(states.get(j) in TERMINAL for j in self.submitted)
                and not read_live_attempts(self.home / "journal.db"))


class Torture:
    """One run: the emulator, the supervisor process, its killer, the checks."""

    def __init__(self, config: TortureConfig, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.home = workdir / "home"
        self.rng = random.Random(config.seed)
        self.emulator = TortureEmulator(
            seed=config.seed, loading_s=config.loading_s, workdir=workdir / "emulator",
            rate_limits=False, offers_per_gpu=config.offers_per_gpu, time_scale=1.0,
            reply_delays_s={CREATE_ENDPOINT: config.create_reply_delay_s},
        )
        self.kill_modes: Counter[str] = Counter()
        self.exits: list[str] = []
        self.tasks: list[asyncio.Task] = []

    async def run(self) -> TortureReport:
        started = time.monotonic()
        source_root = REPO_ROOT
        if self.config.snapshot:
            source_root = snapshot_source(self.workdir / "src")
            # Workers inherit this process's environment through the emulator.
            os.environ["PYTHONPATH"] = str(source_root)
        await self.emulator.start()
        try:
            env = child_env(self.home, self.emulator, write_config_dir(self.home), source_root)
            self.home.mkdir(parents=True, exist_ok=True)
            self.chaos = Chaos(self.emulator, self.config, random.Random(self.config.seed + 1))
            self.emulator.set_faults(self.chaos.http_plan())
            self.sampler = LiveSampler(self.emulator, self.config.sample_interval_s)
            self.feeder = JobFeeder(self.config, env, self.home,
                                    random.Random(self.config.seed + 2))
            self.supervisor = SupervisorProcess(env, self.config.tick_s,
                                                self.workdir / "supervisor.log")
            await self.supervisor.start()
            self.spawn(self.sampler.run(), self.feeder.run())
            if self.config.chaos:
                self.spawn(self.chaos.run())
            await self.kill_loop()
            await self.settle()
            return await self.report(env, time.monotonic() - started)
        finally:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            if getattr(self, "supervisor", None) is not None:
                await self.supervisor.kill()
            await self.emulator.stop()

    def spawn(self, *coros: Any) -> None:
        self.tasks += [asyncio.get_running_loop().create_task(coro) for coro in coros]

    async def kill_loop(self) -> None:
        for number in range(1, self.config.kills + 1):
            mode = await self.wait_for_kill_moment()
            await self.restart_if_exited()
            await self.supervisor.kill()
            self.kill_modes[mode] += 1
            log.info("kill %d (%s) of supervisor generation %d", number, mode,
                     self.supervisor.generation)
            await asyncio.sleep(self.rng.uniform(*self.config.down_s))
            await self.supervisor.start()
        self.feeder.keep_submitting = False

    async def wait_for_kill_moment(self) -> str:
        """Sleep until the next kill: a random pause, or inside a create or destroy call."""
        if self.rng.random() >= self.config.targeted_kill_share:
            await asyncio.sleep(self.rng.uniform(*self.config.kill_gap_s))
            return "pause"
        endpoint, delay_s = self.rng.choice((
            (CREATE_ENDPOINT, self.config.create_delay_s + self.config.create_reply_delay_s),
            (DESTROY_ENDPOINT, self.config.destroy_delay_s),
        ))
        before = self.emulator.request_count(endpoint)
        deadline = time.monotonic() + 4 * self.config.kill_gap_s[1]
        while self.emulator.request_count(endpoint) == before:
            if time.monotonic() > deadline:
                return "pause"  # no such call came; kill anyway
            await asyncio.sleep(0.01)
        await asyncio.sleep(self.rng.uniform(0.0, delay_s))
        return "in create" if endpoint == CREATE_ENDPOINT else "in destroy"

    async def restart_if_exited(self) -> None:
        exited = self.supervisor.exited_early()
        if exited is not None:
            self.exits.append(f"{exited}; see {self.supervisor.log_path}")
            log.warning("supervisor %s; restarting it", exited)
            await self.supervisor.start()

    async def settle(self) -> None:
        """Let the last supervisor run until every job ended and no instance is alive."""
        deadline = time.monotonic() + self.config.settle_timeout_s
        for task in self.tasks[2:]:
            task.cancel()  # no more chaos; the sampler and the feeder keep going
        self.emulator.set_faults(FaultPlan())
        while time.monotonic() < deadline:
            await self.restart_if_exited()
            if (await asyncio.to_thread(self.feeder.settled)
                    and not self.emulator.live_instance_ids()
                    and not await asyncio.to_thread(count_unsettled, self.home / "journal.db")):
                break
            await asyncio.sleep(0.5)
        else:
            log.warning("jobs did not settle within %.0f s", self.config.settle_timeout_s)
        await self.restart_if_exited()
        code = await self.supervisor.stop()
        if code not in (0, None):
            self.exits.append(f"final SIGTERM stop returned exit code {code}")
        self.sampler.sample()

    async def report(self, env: dict[str, str], duration_s: float) -> TortureReport:
        from gpujobs.jobs import open_journal
        from gpujobs.settings import load_settings

        ledger = self.emulator.ledger()
        store = await open_journal(load_settings(home=self.home))
        try:
            events = await store.read_all()
        finally:
            await store.close()
        audit_code, audit_output = await run_cli(env, "audit", "verify")
        replay_code, replay_output = await run_cli(env, "replay", "--all", "--check")
        status_code, status_output = await run_cli(env, "status", "--json")
        states = ({row["job_id"]: row["state"] for row in yaml.safe_load(status_output)}
                  if status_code == 0 else {})
        report = TortureReport(
            config=self.config, kills=sum(self.kill_modes.values()),
            kill_modes=dict(self.kill_modes), supervisor_exits=self.exits,
            submit_failures=self.feeder.failures, duration_s=duration_s,
            jobs={job_id: states.get(job_id, "missing") for job_id in self.feeder.submitted},
            expected=dict(self.feeder.expected), instances=len(ledger),
            samples=self.sampler.samples, max_live_per_job=self.sampler.max_per_job,
            doubled_samples=self.sampler.doubled, overlaps=find_overlaps(ledger),
            live_at_end=self.emulator.live_instance_ids(),
            unknown_labels=find_unknown_labels(ledger, set(self.feeder.submitted)),
            early_destroy_records=find_early_destroys(ledger, events),
            audit_output=audit_output, audit_ok=audit_code == 0,
            replay_output=replay_output[-2000:], replay_ok=replay_code == 0,
            costs=match_costs(ledger, events), chaos_events=dict(self.chaos.counts),
            journal_events=count_events(events), home=str(self.home),
        )
        (self.workdir / "ledger.json").write_text(json.dumps(ledger, indent=1))
        (self.workdir / "summary.json").write_text(json.dumps(report.summary(), indent=1))
        return report


def count_events(events: list[Any]) -> dict[str, int]:
    counts = Counter(event.type for event in events)
    counts["adopted"] = sum(1 for event in events
                            if event.type == "InstanceCreated" and event.data.get("adopted"))
    return dict(sorted(counts.items()))


def find_overlaps(ledger: list[dict[str, Any]]) -> list[str]:
    """Instances of one job whose lifetimes overlap, from the emulator's own timestamps."""
    by_job: dict[str, list[dict[str, Any]]] = {}
    for row in ledger:
        key = parse_label(row["label"])
        if key is not None:
            by_job.setdefault(key[0], []).append(row)
    found = []
    for job_id, rows in sorted(by_job.items()):
        rows.sort(key=lambda row: row["created_at"])
        for before, after in zip(rows, rows[1:]):
            ended = before["destroyed_at"]
            if ended is None or after["created_at"] < ended:
                found.append(f"job {job_id}: instance {after['id']} ({after['label']}) created "
                             f"at {after['created_at']:.3f} while {before['id']} "
                             f"({before['label']}) lived until {ended}")
    return found


def find_unknown_labels(ledger: list[dict[str, Any]], job_ids: set[str]) -> list[str]:
    found = []
    for row in ledger:
        key = parse_label(row["label"])
        if key is None or key[0] not in job_ids:
            found.append(f"{row['label']!r} on instance {row['id']}")
    return found


def find_early_destroys(ledger: list[dict[str, Any]], events: list[Any]) -> list[str]:
    """InstanceDestroyed events recorded before the emulator had destroyed the instance."""
    destroyed_at = {row["id"]: row["destroyed_at"] for row in ledger}
    found = []
    for event in events:
        if event.type != "InstanceDestroyed":
            continue
        instance_id = event.data["instance_id"]
        gone_at = destroyed_at.get(instance_id)
        if gone_at is None or event.recorded_at < gone_at:
            found.append(f"job {event.stream} seq {event.seq}: instance {instance_id} recorded "
                         f"destroyed at {event.recorded_at:.3f}, emulator destroyed it at "
                         f"{gone_at}")
    return found


def match_costs(ledger: list[dict[str, Any]], events: list[Any]) -> list[InstanceCost]:
    """Pair each instance's bill from the emulator with the CostAccrued sum in the journal."""
    journal_usd: Counter[int] = Counter()
    estimate_usd: Counter[int] = Counter()
    settled: set[int] = set()
    spans: dict[int, tuple[float, float]] = {}
    for event in events:
        if event.type != "CostAccrued":
            continue
        instance_id = int(event.data["instance_id"])
        journal_usd[instance_id] += float(event.data["amount_usd"])
        if event.data.get("settled_usd") is not None:
            settled.add(instance_id)
            continue
        estimate_usd[instance_id] += float(event.data["amount_usd"])
        start = float(event.data["through"]) - float(event.data["billed_s"])
        low, high = spans.get(instance_id, (start, float(event.data["through"])))
        spans[instance_id] = (min(low, start), max(high, float(event.data["through"])))
    costs = []
    for row in ledger:
        low, high = spans.get(row["id"], (None, None))
        costs.append(InstanceCost(row["id"], row["label"] or "", float(row["cost_usd"]),
                                  journal_usd.pop(row["id"], 0.0), row["created_at"],
                                  row["destroyed_at"], low, high, estimate_usd[row["id"]],
                                  row["id"] in settled))
    costs += [InstanceCost(instance_id, "", 0.0, amount, estimate_usd=estimate_usd[instance_id])
              for instance_id, amount in sorted(journal_usd.items())]
    return costs


async def run_torture(config: TortureConfig, workdir: Path) -> TortureReport:
    """Run one torture in the running event loop; `workdir` receives every file it writes."""
    workdir.mkdir(parents=True, exist_ok=True)
    return await Torture(config, workdir).run()
