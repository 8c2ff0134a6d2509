"""Example job: a small MLP on scikit-learn's bundled digits (no download), resumable.

Batches come from a per-epoch permutation seeded by (seed, epoch), so the data position is
just (epoch, batch index): a resumed run gets the same batches as an uninterrupted one.
"""

from __future__ import annotations

import io
import logging
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from worker.rng import capture_rng_state, restore_rng_state

logger = logging.getLogger(__name__)

BATCH_SIZE = 64
LEARNING_RATE = 3e-3
TEST_FRACTION = 0.2
SPLIT_SEED = 0
STATE_FORMAT = 1


@dataclass(frozen=True)
class DigitsData:
    """Standardized train and held-out tensors; the split does not depend on the job's seed."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_data(device: torch.device) -> DigitsData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=TEST_FRACTION, random_state=SPLIT_SEED,
        stratify=digits.target,
    )  # fmt: skip
    scaler = StandardScaler().fit(x_train)

    def features(values: np.ndarray) -> torch.Tensor:
        return torch.tensor(scaler.transform(values), dtype=torch.float32, device=device)

    def labels(values: np.ndarray) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return DigitsData(features(x_train), labels(y_train), features(x_test), labels(y_test))


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def configure_determinism(seed: int, device: torch.device) -> None:
    """Seed every generator and make torch pick deterministic kernels."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.set_num_threads(1)  # the model is tiny, and one thread keeps reductions in order
    torch.use_deterministic_algorithms(True)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class DigitsTrainer:
    """Model, optimizer, scheduler and data position; state() and load_state() round-trip.

    With world_size > 1, every rank walks the same batch order and trains on the slice
    batch[rank::world_size], so the data position is the same on every rank and in every
    checkpoint; set `network` to the DistributedDataParallel wrapper of `model`.
    """

    def __init__(
        self,
        data: DigitsData,
        total_steps: int,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.data = data
        self.rank = rank
        self.world_size = world_size
        self.total_steps = total_steps
        self.seed = seed
        self.device = device
        self.model = build_model().to(device)
        self.network: nn.Module = self.model  # what the forward pass runs through
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LEARNING_RATE)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=total_steps
        )
        self.loss_fn = nn.CrossEntropyLoss()
        self.step = 0
        self.epoch = 0
        self.batch_index = 0
        self._order: torch.Tensor | None = None

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.data.y_train) // BATCH_SIZE)

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(len(self.data.y_train), generator=generator)
        return self._order

    def train_step(self) -> float:
        """Train on the next batch; return its loss."""
        start = self.batch_index * BATCH_SIZE
        batch = self._epoch_order()[start : start + BATCH_SIZE]
        indices = batch[self.rank :: self.world_size].to(self.device)
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.network(self.data.x_train[indices]), self.data.y_train[indices])
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()

        self.step += 1
        self.batch_index += 1
        if self.batch_index == self.batches_per_epoch:
            self.epoch, self.batch_index, self._order = self.epoch + 1, 0, None
        return float(loss.detach())

    def learning_rate(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    @torch.no_grad()
    def test_accuracy(self) -> float:
        self.model.eval()
        predictions = self.model(self.data.x_test).argmax(dim=1)
        return float((predictions == self.data.y_test).float().mean())

    def state(self) -> dict[str, Any]:
        """Everything a resumed run needs; only tensors and plain types (weights_only loads)."""
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng_state(),
            "data": {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed},
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore state(); raises KeyError, ValueError or RuntimeError if it does not fit.

        A checkpoint of several ranks keeps each rank's generator states under "rank_rng".
        This rank restores its own; with another world size it restores rank 0's, so the
        run continues correctly but not bitwise like an uninterrupted one.
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown checkpoint format {state.get('format')!r}")
        if state["data"]["seed"] != self.seed:
            raise ValueError(
                f"checkpoint was made with seed {state['data']['seed']}, this job uses {self.seed}"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rank_states = state.get("rank_rng") or []
        if self.world_size > 1 and len(rank_states) == self.world_size:
            restore_rng_state(rank_states[self.rank])
        else:
            restore_rng_state(state["rng"])
        self.step = int(state["step"])
        self.epoch = int(state["data"]["epoch"])
        self.batch_index = int(state["data"]["batch_index"])
        self._order = None

    def model_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(self.model.state_dict(), buffer)
        return buffer.getvalue()


def run_digits_job(session: Any) -> int:
    """Run the digits job in session (a WorkerSession); return the process exit code."""
    from worker import protocol
    from worker.errors import BadCheckpoint

    config = session.config
    marker = session.completion_marker()
    if marker is not None:
        return session.already_completed(marker)

    device = _pick_device(config.device)
    configure_determinism(config.seed, device)
    trainer = DigitsTrainer(load_digits_data(device), config.total_steps, config.seed, device)
    try:
        restored = session.restore(map_location=device)
    except BadCheckpoint as exc:
        return session.fail(str(exc), protocol.EXIT_BAD_CHECKPOINT)
    if restored is not None:
        try:
            trainer.load_state(restored[1])
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            message = (
                f"checkpoint at step {restored[0].step} ({restored[0].uri}) does not fit this "
                f"model: {exc!r}; delete it or run the code that wrote it"
            )
            return session.fail(message, protocol.EXIT_BAD_CHECKPOINT)

    session.started(trainer.step, restored[0] if restored else None)
    return _train(session, trainer)


def _train(session: Any, trainer: DigitsTrainer) -> int:
    config = session.config
    preemption = session.preemption
    metrics: dict[str, float] = {}
    while trainer.step < config.total_steps:
        if preemption.stop_requested:
            return session.stop(trainer.step, trainer.state())
        loss = trainer.train_step()
        metrics = {"loss": loss, "lr": trainer.learning_rate()}
        session.step(trainer.step, metrics)
        if trainer.step % 50 == 0 or trainer.step == config.total_steps:
            logger.info("step %d/%d loss %.4f", trainer.step, config.total_steps, loss)
        if session.checkpoint_due(trainer.step):
            session.checkpoint(trainer.step, trainer.state())
        if config.step_delay_s:
            preemption.wait(config.step_delay_s)

    final_metrics = {"test_accuracy": trainer.test_accuracy()}
    if "loss" in metrics:
        final_metrics["train_loss"] = metrics["loss"]
    return session.complete(trainer.step, trainer.model_bytes(), final_metrics)


def _pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
