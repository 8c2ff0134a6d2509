"""Several GPUs on one instance: launch one process per GPU under torchrun, and the collectives
the ranks use to agree on when to stop.

The launcher is the process the instance starts (PID 1's child, behind tini). It runs
`python -m torch.distributed.run --standalone` and forwards SIGTERM and SIGINT to it; the
elastic agent forwards them to every rank. The agent takes any non-zero exit of a rank for a
failure and then kills the other ranks. So a rank launched this way writes its real exit code
to a file and exits 0, and the launcher returns rank 0's code.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from worker import protocol

logger = logging.getLogger(__name__)

ENV_RANK_RESULT_DIR = "GPUJOBS_RANK_RESULT_DIR"  # set by the launcher for the ranks it starts
# Seconds the elastic agent waits for ranks after forwarding SIGTERM, beyond the grace period.
SHUTDOWN_MARGIN_S = 15


@dataclass(frozen=True)
class RankInfo:
    """This process's place in a torchrun group, read from the variables torchrun sets."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RankInfo | None:
        """Return the rank when this process runs under torchrun with more than one rank."""
        env = os.environ if env is None else env
        world_size = int(env.get("WORLD_SIZE", "1") or 1)
        if world_size <= 1:
            return None
        return cls(int(env["RANK"]), world_size, int(env.get("LOCAL_RANK", env["RANK"])))


def torchrun_command(nproc: int, module_args: list[str]) -> list[str]:
    """Return the torchrun command line that runs `python -m <module_args>` once per rank."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0",
        "-m", *module_args,
    ]  # fmt: skip


def launch_ranks(nproc: int, module_args: list[str], grace_period_s: float) -> int:
    """Run module_args under torchrun with nproc ranks; return rank 0's exit code.

    SIGTERM and SIGINT received here are forwarded once to torchrun. Returns EXIT_FAILED when
    rank 0 left no exit code (it crashed or was killed).
    """
    with tempfile.TemporaryDirectory(prefix="gpujobs-ranks-") as result_dir:
        env = {
            **os.environ,
            ENV_RANK_RESULT_DIR: result_dir,
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(int(grace_period_s) + SHUTDOWN_MARGIN_S),
        }
        env.setdefault("OMP_NUM_THREADS", "1")
        logger.info("launching %d ranks under torchrun", nproc)
        child = subprocess.Popen(torchrun_command(nproc, module_args), env=env)
        previous = _forward_signals(child)
        try:
            torchrun_code = child.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        code = read_rank_exit_code(Path(result_dir), 0)
    if code is None:
        logger.error("rank 0 left no exit code; torchrun exited with %d", torchrun_code)
        return protocol.EXIT_FAILED
    logger.info("ranks finished: rank 0 exit code %d, torchrun %d", code, torchrun_code)
    return code


def _forward_signals(child: subprocess.Popen) -> dict[int, Any]:
    forwarded: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        if forwarded or child.poll() is not None:
            return
        forwarded.append(signum)
        logger.warning("forwarding %s to the ranks", signal.Signals(signum).name)
        child.send_signal(signum)

    return {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}


def write_rank_exit_code(rank: RankInfo, code: int, env: Mapping[str, str] | None = None) -> int:
    """Record code for the launcher and return the code this process should exit with.

    Under launch_ranks that is 0, so the elastic agent does not kill the other ranks.
    """
    env = os.environ if env is None else env
    folder = env.get(ENV_RANK_RESULT_DIR)
    if not folder:
        return code
    path = Path(folder) / f"rank-{rank.rank}.exit"
    temp = path.with_suffix(".partial")
    temp.write_text(str(code))
    os.replace(temp, path)
    return 0


def read_rank_exit_code(folder: Path, rank: int) -> int | None:
    try:
        return int((folder / f"rank-{rank}.exit").read_text())
    except (FileNotFoundError, ValueError):
        return None


class RankGroup:
    """The initialized process group of this rank; call close() before the process ends."""

    def __init__(self, rank: RankInfo, device_type: str) -> None:
        import torch.distributed as dist

        self.rank = rank
        self._dist = dist
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            import torch

            torch.cuda.set_device(rank.local_rank)  # object collectives need the device set
        dist.init_process_group(backend=backend)
        self.backend = backend
        self._agent_pid = os.getppid()
        logger.info("rank %d of %d joined the %s group", rank.rank, rank.world_size, backend)

    def agree_to_stop(self, stop_requested: bool) -> bool:
        """Return True on every rank when any rank was asked to stop; one tiny all-reduce."""
        import torch

        flag = torch.tensor([1 if stop_requested else 0], dtype=torch.int32)
        if self.backend == "nccl":
            flag = flag.cuda()
        self._dist.all_reduce(flag, op=self._dist.ReduceOp.MAX)
        return bool(flag.item())

    def broadcast(self, value: Any) -> Any:
        """Send rank 0's value to every rank and return it."""
        holder = [value if self.rank.is_leader else None]
        self._dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather_to_leader(self, value: Any) -> list[Any] | None:
        """Return every rank's value, in rank order, on rank 0; None elsewhere."""
        gathered: list[Any] | None = [None] * self.rank.world_size if self.rank.is_leader else None
        self._dist.gather_object(value, gathered, dst=0)
        return gathered

    def exit_if_orphaned(self) -> None:
        """Exit at once when the elastic agent is gone (killed by SIGKILL, say).

        The agent starts each rank in its own session, so a kill of the agent's process group
        does not reach the ranks, and they must not train on without it.
        """
        if os.getppid() != self._agent_pid:
            logger.error("rank %d: the torchrun agent is gone; exiting", self.rank.rank)
            os._exit(protocol.EXIT_FAILED)

    def barrier(self) -> None:
        self._dist.barrier()

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()
