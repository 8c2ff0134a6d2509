"""The digits job on several ranks (one per GPU) under torchrun, with DistributedDataParallel.

Rank 0 is the leader: it owns the WorkerSession (reports, log, checkpoint uploads) and alone
writes checkpoints, one file holding the full state and every rank's generator states. It
picks the checkpoint to restore and broadcasts its step; every other rank loads and verifies
that same checkpoint. Before each step the ranks all-reduce their stop flags, so a SIGTERM
that reaches any rank stops all of them after the same step, and rank 0 writes the single
emergency checkpoint while the others wait at a barrier.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import torch

from worker import protocol
from worker.background import BackgroundLoop
from worker.checkpoint_store import load_checkpoint_at
from worker.config import WorkerConfig
from worker.distributed import RankGroup, RankInfo
from worker.errors import BadCheckpoint
from worker.logs import LogCapture
from worker.preemption import PreemptionHandler
from worker.rng import capture_rng_state
from worker.storage import open_storage
from worker.train_digits import DigitsTrainer, configure_determinism, load_digits_data

logger = logging.getLogger(__name__)

# Offset between the ranks' generator seeds, so dropout masks differ between ranks.
RANK_SEED_STRIDE = 7919


def run_rank(config: WorkerConfig, capture: LogCapture | None, rank: RankInfo) -> int:
    """Run this rank of the digits job; return the worker exit code for this rank."""
    device = _rank_device(config.device, rank)
    group = RankGroup(rank, device.type)
    try:
        if rank.is_leader:
            return _run_leader(config, capture, group, device)
        return _run_follower(config, group, device)
    finally:
        group.close()


def _run_leader(
    config: WorkerConfig, capture: LogCapture | None, group: RankGroup, device: torch.device
) -> int:
    from worker.session import WorkerSession

    session = WorkerSession(config, capture)
    with session.preemption:
        try:
            session.preflight()
            return _lead(session, group, device)
        except Exception as exc:
            logger.exception("rank 0 crashed")
            return session.fail(f"worker crashed: {exc!r}")
        finally:
            session.close()


def _lead(session: Any, group: RankGroup, device: torch.device) -> int:
    config = session.config
    marker = session.completion_marker()
    group.broadcast({"completed": marker is not None})
    if marker is not None:
        return session.already_completed(marker)

    trainer = _build_trainer(config, group.rank, device)
    try:
        restored = session.restore(map_location=device)
        if restored is not None:
            trainer.load_state(restored[1])
    except (BadCheckpoint, KeyError, ValueError, RuntimeError, TypeError) as exc:
        group.broadcast({"step": None, "error": str(exc)})
        return session.fail(f"cannot restore the latest checkpoint: {exc}", protocol.EXIT_BAD_CHECKPOINT)
    group.broadcast({"step": restored[0].step if restored else None, "error": None})

    _wrap_ddp(trainer, group.rank, device)
    session.started(trainer.step, restored[0] if restored else None)
    return _train(trainer, group, session.preemption, config, session)


def _run_follower(config: WorkerConfig, group: RankGroup, device: torch.device) -> int:
    if group.broadcast(None)["completed"]:
        return protocol.EXIT_OK
    trainer = _build_trainer(config, group.rank, device)
    choice = group.broadcast(None)
    if choice["error"] is not None:
        return protocol.EXIT_BAD_CHECKPOINT
    if choice["step"] is not None:
        trainer.load_state(_load_step(config.artifact_uri, choice["step"], device))
        logger.info("rank %d restored checkpoint at step %d", group.rank.rank, choice["step"])

    _wrap_ddp(trainer, group.rank, device)
    with PreemptionHandler(config.grace_period_s) as preemption:
        return _train(trainer, group, preemption, config, None)


def _train(
    trainer: DigitsTrainer,
    group: RankGroup,
    preemption: PreemptionHandler,
    config: WorkerConfig,
    session: Any | None,
) -> int:
    """Train on every rank until done or stopped; session is rank 0's WorkerSession, else None."""
    metrics: dict[str, float] = {}
    while trainer.step < config.total_steps:
        group.exit_if_orphaned()
        if group.agree_to_stop(preemption.stop_requested):
            return _stop(trainer, group, session)
        loss = trainer.train_step()
        metrics = {"loss": loss, "lr": trainer.learning_rate()}
        if session is not None:
            session.step(trainer.step, metrics)
            if trainer.step % 50 == 0 or trainer.step == config.total_steps:
                logger.info("step %d/%d loss %.4f", trainer.step, config.total_steps, loss)
        if trainer.step % config.checkpoint_every == 0 and trainer.step < config.total_steps:
            state = _full_state(trainer, group)
            if session is not None:
                session.checkpoint(trainer.step, state)
        if config.step_delay_s:
            preemption.wait(config.step_delay_s)

    code = protocol.EXIT_OK
    if session is not None:
        final_metrics = {"test_accuracy": trainer.test_accuracy()}
        if "loss" in metrics:
            final_metrics["train_loss"] = metrics["loss"]
        code = session.complete(trainer.step, trainer.model_bytes(), final_metrics)
    group.barrier()
    return code


def _stop(trainer: DigitsTrainer, group: RankGroup, session: Any | None) -> int:
    """Stop every rank after the same step; only rank 0 writes the emergency checkpoint."""
    state = _full_state(trainer, group)
    if session is not None:
        code = session.stop(trainer.step, state)
    else:
        logger.warning("rank %d stopping at step %d", group.rank.rank, trainer.step)
        code = protocol.EXIT_PREEMPTED
    group.barrier()  # the other ranks stay alive until rank 0's checkpoint is durable
    return code


def _full_state(trainer: DigitsTrainer, group: RankGroup) -> dict[str, Any] | None:
    """Collect the checkpoint state on rank 0 (with every rank's generators); None elsewhere."""
    rank_rng = group.gather_to_leader(capture_rng_state())
    if not group.rank.is_leader:
        return None
    state = trainer.state()
    state["rank_rng"] = rank_rng
    return state


def _build_trainer(config: WorkerConfig, rank: RankInfo, device: torch.device) -> DigitsTrainer:
    configure_determinism(config.seed + RANK_SEED_STRIDE * rank.rank, device)
    data = load_digits_data(device)
    return DigitsTrainer(
        data, config.total_steps, config.seed, device, rank=rank.rank, world_size=rank.world_size
    )


def _wrap_ddp(trainer: DigitsTrainer, rank: RankInfo, device: torch.device) -> None:
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [rank.local_rank] if device.type == "cuda" else None
    trainer.network = DistributedDataParallel(trainer.model, device_ids=device_ids)


def _load_step(artifact_uri: str, step: int, device: torch.device) -> dict[str, Any]:
    loop = BackgroundLoop()
    storage = open_storage(artifact_uri)
    try:
        _ref, payload = loop.run(load_checkpoint_at(storage, step), timeout_s=300)
        loop.run(storage.close(), timeout_s=10)
    finally:
        loop.close()
    return torch.load(io.BytesIO(payload), weights_only=True, map_location=device)


def _rank_device(name: str | None, rank: RankInfo) -> torch.device:
    if name == "cpu" or (name is None and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", rank.local_rank)
