"""The digits trainer in process: resume at any step is bitwise identical; accuracy target."""

from __future__ import annotations

import io

import pytest
import torch

from worker.config import WorkerConfig
from worker.errors import ConfigError
from worker.train_digits import DigitsTrainer, configure_determinism, load_digits_data

CPU = torch.device("cpu")
TOTAL_STEPS = 120


@pytest.fixture(scope="module")
def data():
    return load_digits_data(CPU)


def fresh_trainer(data, seed: int = 3) -> DigitsTrainer:
    configure_determinism(seed, CPU)
    return DigitsTrainer(data, TOTAL_STEPS, seed, CPU)


def train_to(trainer: DigitsTrainer, step: int) -> None:
    while trainer.step < step:
        trainer.train_step()


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True, map_location=CPU)


@pytest.fixture(scope="module")
def reference_weights(data) -> dict[str, torch.Tensor]:
    trainer = fresh_trainer(data)
    train_to(trainer, TOTAL_STEPS)
    return trainer.model.state_dict()


# 22 and 23 straddle an epoch boundary (23 batches per epoch); 1 and 119 are the edges.
@pytest.mark.parametrize("stop_step", [1, 22, 23, 50, 119])
def test_resume_is_bitwise_identical(data, reference_weights, stop_step: int) -> None:
    first = fresh_trainer(data)
    train_to(first, stop_step)
    state = roundtrip(first.state())
    torch.manual_seed(12345)  # a restarted process would have other RNG states

    second = fresh_trainer(data, seed=3)
    torch.rand(10)
    second.load_state(state)
    train_to(second, TOTAL_STEPS)

    weights = second.model.state_dict()
    for name, tensor in reference_weights.items():
        assert torch.equal(tensor, weights[name]), name


def test_reaches_accuracy_target(data) -> None:
    trainer = DigitsTrainer(data, 600, 0, CPU)
    configure_determinism(0, CPU)
    train_to(trainer, 600)

    assert trainer.test_accuracy() >= 0.96


def test_state_with_other_seed_rejected(data) -> None:
    state = roundtrip(fresh_trainer(data, seed=1).state())

    with pytest.raises(ValueError) as caught:
        fresh_trainer(data, seed=2).load_state(state)

    assert "seed 1" in str(caught.value)


def test_config_defaults_and_overrides() -> None:
    env = {
        "GPUJOBS_JOB_ID": "job-1",
        "GPUJOBS_ARTIFACT_URI": "file:///tmp/x",
        "GPUJOBS_JOB_TOKEN": "hidden-value",
        "GPUJOBS_CHECKPOINT_EVERY": "25",
    }

    config = WorkerConfig.from_env(env)

    assert config.attempt == 1
    assert config.total_steps == 600
    assert config.checkpoint_every == 25
    assert config.keep_checkpoints == 3
    assert config.grace_period_s == 10.0
    assert config.heartbeat_interval_s == 2.0
    assert "hidden-value" not in repr(config)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("GPUJOBS_GRACE_PERIOD_S", "-1", "at least 0"),
        ("GPUJOBS_KEEP_CHECKPOINTS", "two", "an integer"),
        ("GPUJOBS_REPORT_MODE", "pigeon", "'mailbox'"),
        ("GPUJOBS_HEARTBEAT_INTERVAL_S", "0", "positive"),
    ],
)
def test_config_rejects_bad_values(name: str, value: str, expected: str) -> None:
    env = {"GPUJOBS_JOB_ID": "j", "GPUJOBS_ARTIFACT_URI": "file:///x", name: value}

    with pytest.raises(ConfigError) as caught:
        WorkerConfig.from_env(env)

    assert name in str(caught.value)
    assert expected in str(caught.value)
