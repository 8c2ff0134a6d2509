"""Emulated instances: the state fields the API reports, their lifecycle and their billing.

Lifecycle: created with ``actual_status`` null, then ``loading`` for ``loading_s``, then the
command starts and the instance is ``running`` until the command ends (``exited``, with the
exit code in ``status_msg``). A user stop, a preemption and a host failure change the state
fields the way the real API does; see each method.

Every duration here (loading, a timed fault's delay, a grace period) is in emulated seconds;
the fleet waits that many divided by ``time_scale`` in real seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from gpujobs.emulator import container
from gpujobs.emulator.billing import FleetSpend, Meter
from gpujobs.emulator.faults import FaultRule, FaultState

logger = logging.getLogger(__name__)

# cur_state values in which the GPU is reserved and billed, loading included.
# NOTE: an exited container keeps billing the GPU until it is stopped or destroyed, and a
# dropped host bills storage only. The real API documents neither case.
_GPU_BILLED_STATES = frozenset({"running"})
# actual_status values of a dropped host: "offline" when disconnected, "unknown" when its
# heartbeat stopped.
HOST_DOWN_STATUSES = frozenset({"offline", "unknown"})
# Statuses from which a start request boots the instance again although cur_state is running.
_RESTARTABLE_STATUSES = HOST_DOWN_STATUSES | {"exited"}


@dataclass
class EmulatedInstance:
    id: int
    offer: dict[str, Any]
    image: str
    env: dict[str, str]
    onstart: str | None
    args: list[str] | None
    runtype: str | None
    label: str | None
    disk_gb: float
    price: float | None  # bid in $/hour; None for on-demand
    directory: Path
    meter: Meter
    created_at: float = field(default_factory=time.time)
    destroyed_at: float | None = None
    start_date: float | None = None
    actual_status: str | None = None
    intended_status: str = "running"
    cur_state: str = "running"
    next_state: str = "running"
    status_msg: str | None = None
    process: asyncio.subprocess.Process | None = None
    generation: int = 0  # bumped on every boot, so stale timers and watchers do nothing
    tasks: set = field(default_factory=set)

    @property
    def is_bid(self) -> bool:
        return self.price is not None

    @property
    def log_path(self) -> Path:
        return self.directory / "container.log"

    @property
    def gpu_dph(self) -> float:
        return float(self.price) if self.is_bid else float(self.offer["dph_base"])

    @property
    def disk_dph(self) -> float:
        return self.disk_gb * float(self.offer["storage_cost"]) / 720.0

    @property
    def dph_total(self) -> float:
        return round(self.gpu_dph + self.disk_dph, 6)

    @property
    def destroyed(self) -> bool:
        return self.destroyed_at is not None

    def status_label(self) -> str:
        return "destroyed" if self.destroyed else (self.actual_status or "created")

    def cost_usd(self) -> float:
        return self.meter.total_usd()


class Fleet:
    """Every instance created by one emulator, live or destroyed."""

    def __init__(self, *, workdir: Path, time_scale: float, loading_s: float,
                 faults: Callable[[], FaultState], stop_grace_s: float = 2.0):
        self.workdir = workdir
        self.time_scale = time_scale
        self.loading_s = loading_s
        self.stop_grace_s = stop_grace_s
        self._faults = faults
        self.instances: dict[int, EmulatedInstance] = {}
        self.spend = FleetSpend()  # what every instance has cost, without a pass over them

    # Helpers ----------------------------------------------------------------------------

    def real_s(self, emulated_s: float) -> float:
        """Convert emulated seconds into the real seconds to wait."""
        return emulated_s / self.time_scale

    def live(self) -> list[EmulatedInstance]:
        return [inst for inst in self.instances.values() if not inst.destroyed]

    def get_live(self, instance_id: int) -> EmulatedInstance | None:
        inst = self.instances.get(instance_id)
        return None if inst is None or inst.destroyed else inst

    def _spawn_task(self, inst: EmulatedInstance, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        inst.tasks.add(task)
        task.add_done_callback(inst.tasks.discard)
        return task

    def _set(self, inst: EmulatedInstance, **changes: Any) -> None:
        """Change state fields and switch the billing rates to match them."""
        before = inst.actual_status
        for name, value in changes.items():
            setattr(inst, name, value)
        if inst.destroyed:
            inst.meter.set_rates(0.0, 0.0)
        elif inst.cur_state in _GPU_BILLED_STATES and not _host_down(inst):
            inst.meter.set_rates(inst.gpu_dph, inst.disk_dph)
        else:
            inst.meter.set_rates(0.0, inst.disk_dph)
        if inst.actual_status != before:
            logger.info("instance %d: %s -> %s", inst.id, before, inst.actual_status)

    def rerate(self, inst: EmulatedInstance) -> None:
        """Apply a changed bid to the billing rates from now on."""
        self._set(inst)

    # Lifecycle --------------------------------------------------------------------------

    def create(self, instance_id: int, offer: dict, body: dict, *, start: bool) -> EmulatedInstance:
        """Record a new instance; ``start=False`` leaves it stopped (a bid below min_bid)."""
        directory = self.workdir / "instances" / str(instance_id)
        directory.mkdir(parents=True, exist_ok=True)
        inst = EmulatedInstance(
            id=instance_id, offer=offer, image=str(body.get("image") or ""),
            env=container.parse_env_option(body.get("env")), onstart=body.get("onstart"),
            args=body.get("args"), runtype=body.get("runtype"), label=body.get("label"),
            disk_gb=float(body.get("disk") or 10.0), price=_bid(body.get("price")),
            directory=directory, meter=Meter(time_scale=self.time_scale, fleet=self.spend),
        )
        self.instances[instance_id] = inst
        if start:
            self._set(inst)
            self._spawn_task(inst, self._boot(inst))
        else:
            self._set(inst, actual_status="stopped", intended_status="stopped",
                      cur_state="stopped", next_state="stopped",
                      status_msg="bid price is below the offer's min_bid; waiting for a higher bid")
        return inst

    async def _boot(self, inst: EmulatedInstance) -> None:
        inst.generation += 1
        generation = inst.generation
        loading_s = self.real_s(self.loading_s + self._faults().extra_loading_s(inst.id))
        provisioning_s = min(0.25 * loading_s, 0.5)  # actual_status stays null this long
        await asyncio.sleep(provisioning_s)
        if not self._still_booting(inst, generation):
            return
        self._set(inst, actual_status="loading", status_msg="Pulling image " + inst.image)
        await asyncio.sleep(loading_s - provisioning_s)
        if self._still_booting(inst, generation):
            await self._launch(inst, generation)

    @staticmethod
    def _still_booting(inst: EmulatedInstance, generation: int) -> bool:
        return inst.generation == generation and not inst.destroyed and inst.cur_state == "running"

    async def _launch(self, inst: EmulatedInstance, generation: int) -> None:
        argv = container.container_argv(inst.onstart, inst.args, inst.runtype)
        inst.start_date = time.time()
        if argv is not None:
            env = container.container_env(inst.id, inst.env)
            try:
                inst.process = await container.spawn(argv, env, inst.directory, inst.log_path)
            except OSError as exc:
                self._set(inst, actual_status="created",
                          status_msg=f"Error response from daemon: OCI runtime create failed: {exc}")
                return
            self._spawn_task(inst, self._watch(inst, inst.process, generation))
        self._set(inst, actual_status="running", status_msg="success, running " + inst.image)
        for rule in self._faults().timed_rules(inst.id):
            self._spawn_task(inst, self._fire(inst, rule, generation))

    async def _watch(self, inst: EmulatedInstance, process: Any, generation: int) -> None:
        code = await process.wait()
        if inst.process is process and inst.generation == generation and not inst.destroyed:
            inst.process = None
            self._set(inst, actual_status="exited", status_msg=f"container exited with code {code}")

    async def _fire(self, inst: EmulatedInstance, rule: FaultRule, generation: int) -> None:
        await asyncio.sleep(self.real_s(rule.after_s))
        if inst.generation != generation or inst.destroyed or inst.cur_state != "running":
            return
        if rule.kind == "preempt":
            await self.preempt(inst, sigterm=rule.sigterm, grace_s=rule.grace_s)
        else:
            await self.drop_host(inst, rule.kind)

    async def _kill(self, inst: EmulatedInstance, *, sigterm: bool, grace_s: float) -> None:
        inst.generation += 1  # cancels a pending boot and makes the watcher ignore this exit
        process, inst.process = inst.process, None
        if process is not None:
            code = await container.terminate(process, sigterm=sigterm,
                                             grace_s=self.real_s(grace_s))
            logger.info("instance %d: process group %d ended with code %s", inst.id,
                        process.pid, code)

    def request_stop(self, inst: EmulatedInstance) -> Awaitable[None]:
        """Mark a user stop at once; the returned coroutine kills the processes and finishes it."""
        self._set(inst, intended_status="stopped", next_state="stopped")
        return self._finish_stop(inst)

    async def stop(self, inst: EmulatedInstance) -> None:
        """User stop: SIGTERM, a short grace, SIGKILL; the GPU is released, storage bills on."""
        await self.request_stop(inst)

    async def _finish_stop(self, inst: EmulatedInstance) -> None:
        await self._kill(inst, sigterm=True, grace_s=self.stop_grace_s)
        self._set(inst, actual_status="stopped", cur_state="stopped", status_msg="stopped by user")

    async def start(self, inst: EmulatedInstance) -> None:
        """Start a stopped instance on the same machine; the command runs again."""
        if inst.cur_state == "running" and inst.actual_status not in _RESTARTABLE_STATUSES:
            return
        await self._kill(inst, sigterm=False, grace_s=0.0)
        self._set(inst, actual_status=None, intended_status="running", cur_state="running",
                  next_state="running", status_msg=None)
        self._spawn_task(inst, self._boot(inst))

    async def preempt(self, inst: EmulatedInstance, *, sigterm: bool = True,
                      grace_s: float = 5.0) -> None:
        """Outbid: the processes are killed and every state field reads "stopped"."""
        await self._kill(inst, sigterm=sigterm, grace_s=grace_s)
        self._set(inst, actual_status="stopped", intended_status="stopped", cur_state="stopped",
                  next_state="stopped", status_msg="instance stopped: outbid by a higher bid")

    async def drop_host(self, inst: EmulatedInstance, status: str) -> None:
        """Host failure: the processes die and the instance reads "offline" or "unknown"."""
        if status not in HOST_DOWN_STATUSES:
            raise ValueError(f"host status {status!r} is invalid; use offline or unknown")
        await self._kill(inst, sigterm=False, grace_s=0.0)
        message = "host is offline" if status == "offline" else "no heartbeat from the host"
        self._set(inst, actual_status=status, status_msg=message)

    async def destroy(self, inst: EmulatedInstance) -> None:
        """Kill the process group at once and stop billing; the row disappears from the API."""
        await self._kill(inst, sigterm=False, grace_s=0.0)
        self._set(inst, destroyed_at=time.time(), cur_state="unloaded")
        for task in list(inst.tasks):
            if task is not asyncio.current_task():
                task.cancel()

    async def shutdown(self) -> None:
        for inst in self.instances.values():
            for task in list(inst.tasks):
                task.cancel()
            await self._kill(inst, sigterm=False, grace_s=0.0)


def _host_down(inst: EmulatedInstance) -> bool:
    return inst.actual_status in HOST_DOWN_STATUSES


def _bid(value: Any) -> float | None:
    return None if value is None else float(value)
