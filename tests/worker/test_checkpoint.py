"""Checkpoint layout, latest(), pruning and the background upload, over both backends."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path

import pytest
import torch

from worker import protocol
from worker.background import BackgroundLoop
from worker.checkpoint import CheckpointManager
from worker.checkpoint_store import (
    find_latest_checkpoint,
    list_checkpoints,
    load_latest_checkpoint,
    prune_checkpoints,
    write_checkpoint,
)
from worker.errors import BadCheckpoint, CheckpointTimeout
from worker.storage import LocalStorage

PAYLOAD = protocol.PAYLOAD_NAME
MANIFEST = protocol.MANIFEST_NAME


async def test_manifest_written_after_payload(storage) -> None:
    order: list[str] = []
    original = storage.put_bytes

    async def recording_put(key: str, data: bytes) -> None:
        order.append(key)
        await original(key, data)

    storage.put_bytes = recording_put
    ref = await write_checkpoint(storage, 7, b"payload")

    folder = protocol.checkpoint_prefix(7)
    assert order == [f"{folder}/{PAYLOAD}", f"{folder}/{MANIFEST}"]
    assert ref.step == 7
    assert ref.size_bytes == 7
    assert ref.uri.endswith(f"{folder}/{PAYLOAD}")


async def test_latest_is_highest_number(storage) -> None:
    await write_checkpoint(storage, 99, b"ninety-nine")
    await write_checkpoint(storage, 100, b"hundred")

    ref = await find_latest_checkpoint(storage)

    assert ref is not None
    assert ref.step == 100


async def test_latest_parses_unpadded_names(storage) -> None:
    # "step-9" sorts after "step-000000000010" by name; the number decides.
    await write_checkpoint(storage, 10, b"ten")
    manifest = protocol.CheckpointManifest(step=9, sha256="0" * 64, size_bytes=1, created_at=0)
    await storage.put_bytes("checkpoints/step-9/payload.pt", b"x")
    await storage.put_bytes("checkpoints/step-9/manifest.json", manifest.to_json().encode())
    await storage.put_bytes("checkpoints/step-11x/manifest.json", b"{}")

    found = await list_checkpoints(storage)
    ref = await find_latest_checkpoint(storage)

    assert [item.step for item in found] == [10, 9]
    assert ref is not None
    assert ref.step == 10


async def test_latest_none_when_empty(storage) -> None:
    assert await find_latest_checkpoint(storage) is None


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("corrupt_payload", "SHA-256"),
        ("truncated_payload", "bytes, manifest expects"),
        ("missing_manifest", "no manifest"),
        ("missing_payload", "payload payload.pt is missing"),
        ("garbled_manifest", "invalid checkpoint manifest"),
        ("wrong_step_manifest", "manifest names step 50"),
    ],
)
async def test_damaged_checkpoint_skipped_with_warning(
    storage, caplog: pytest.LogCaptureFixture, damage: str, reason: str
) -> None:
    await write_checkpoint(storage, 50, b"good old payload")
    await write_checkpoint(storage, 100, b"newer payload")
    folder = protocol.checkpoint_prefix(100)
    if damage == "corrupt_payload":
        await storage.put_bytes(f"{folder}/{PAYLOAD}", b"newer paylaod")
    elif damage == "truncated_payload":
        await storage.put_bytes(f"{folder}/{PAYLOAD}", b"newer")
    elif damage == "missing_manifest":
        await storage.delete(f"{folder}/{MANIFEST}")
    elif damage == "missing_payload":
        await storage.delete(f"{folder}/{PAYLOAD}")
    elif damage == "garbled_manifest":
        await storage.put_bytes(f"{folder}/{MANIFEST}", b"{not json")
    else:
        manifest = await storage.get_bytes(protocol.checkpoint_prefix(50) + f"/{MANIFEST}")
        await storage.put_bytes(f"{folder}/{MANIFEST}", manifest)

    with caplog.at_level(logging.WARNING, logger="worker.checkpoint_store"):
        found = await load_latest_checkpoint(storage)

    assert found is not None
    assert found[0].step == 50
    assert found[1] == b"good old payload"
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert "step 100" in warnings[0]
    assert reason in warnings[0]


async def test_unverified_lookup_skips_download(storage) -> None:
    await write_checkpoint(storage, 5, b"payload five")
    await storage.put_bytes(protocol.checkpoint_prefix(5) + f"/{PAYLOAD}", b"changed!")

    quick = await find_latest_checkpoint(storage, verify_payload=False)
    full = await find_latest_checkpoint(storage)

    assert quick is not None
    assert quick.step == 5
    assert full is None


async def test_prune_keeps_last_k(storage) -> None:
    for step in (10, 20, 30, 40, 50):
        await write_checkpoint(storage, step, f"state {step}".encode())

    deleted = await prune_checkpoints(storage, durable_step=50, keep=3)

    assert deleted == [20, 10]
    assert [item.step for item in await list_checkpoints(storage)] == [50, 40, 30]


async def test_prune_leaves_newer_partial_alone(storage) -> None:
    await write_checkpoint(storage, 10, b"ten")
    await write_checkpoint(storage, 20, b"twenty")
    await storage.put_bytes(protocol.checkpoint_prefix(30) + f"/{PAYLOAD}", b"half")

    await prune_checkpoints(storage, durable_step=20, keep=1)

    assert [item.step for item in await list_checkpoints(storage)] == [30, 20]
    ref = await find_latest_checkpoint(storage)
    assert ref is not None
    assert ref.step == 20


async def test_prune_with_keep_one_keeps_durable(storage) -> None:
    await write_checkpoint(storage, 1, b"one")
    await write_checkpoint(storage, 2, b"two")

    await prune_checkpoints(storage, durable_step=2, keep=1)

    ref = await find_latest_checkpoint(storage)
    assert ref is not None
    assert ref.step == 2
    assert [item.step for item in await list_checkpoints(storage)] == [2]


# The manager: background uploads from synchronous code.


@pytest.fixture
def background() -> BackgroundLoop:
    loop = BackgroundLoop()
    yield loop
    loop.close()


class GatedStorage(LocalStorage):
    """A folder storage whose payload writes wait until the test opens the gate."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.payload_writes: list[str] = []

    async def put_bytes(self, key: str, data: bytes) -> None:
        if key.endswith(PAYLOAD):
            self.payload_writes.append(key)
            await asyncio.to_thread(self.gate.wait, 30)
        await super().put_bytes(key, data)


def test_manager_roundtrip(tmp_path: Path, background: BackgroundLoop) -> None:
    storage = LocalStorage(tmp_path)
    durable: list[protocol.CheckpointRef] = []
    manager = CheckpointManager(storage, background, on_durable=durable.append)
    state = {"weights": torch.arange(6.0), "step": 3, "rng": [1, (2, 3), None]}

    manager.save(3, state)
    ref = manager.wait_durable(10)
    restored = CheckpointManager(storage, background).restore_latest("cpu")

    assert ref is not None
    assert ref.step == 3
    assert durable == [ref]
    assert restored is not None
    assert restored[0] == ref
    assert torch.equal(restored[1]["weights"], state["weights"])
    assert restored[1]["rng"] == [1, (2, 3), None]


def test_save_returns_before_upload(tmp_path: Path, background: BackgroundLoop) -> None:
    storage = GatedStorage(tmp_path)
    manager = CheckpointManager(storage, background)
    weights = torch.zeros(4)

    manager.save(1, {"weights": weights})
    weights += 5  # training continues while the upload waits

    with pytest.raises(CheckpointTimeout):
        manager.wait_durable(0.2)
    storage.gate.set()
    assert manager.wait_durable(10).step == 1
    restored = manager.restore_latest()
    assert torch.equal(restored[1]["weights"], torch.zeros(4))


def test_pending_snapshot_superseded(tmp_path: Path, background: BackgroundLoop) -> None:
    storage = GatedStorage(tmp_path)
    durable: list[int] = []
    manager = CheckpointManager(
        storage, background, on_durable=lambda ref: durable.append(ref.step)
    )

    manager.save(1, {"step": 1})
    _wait_until(lambda: len(storage.payload_writes) == 1)
    manager.save(2, {"step": 2})
    manager.save(3, {"step": 3})
    storage.gate.set()
    ref = manager.wait_durable(10)

    assert ref.step == 3
    assert manager.superseded_steps == [2]
    assert durable == [1, 3]
    assert [item.step for item in asyncio.run(list_checkpoints(storage))] == [3, 1]


def test_failed_upload_keeps_previous(tmp_path: Path, background: BackgroundLoop) -> None:
    storage = LocalStorage(tmp_path / "store")
    manager = CheckpointManager(storage, background)
    manager.save(1, {"step": 1})
    manager.wait_durable(10)
    (tmp_path / "store" / "checkpoints" / "step-000000000002").write_text("blocks the folder")

    manager.save(2, {"step": 2})
    ref = manager.wait_durable(10)

    assert ref.step == 1
    assert manager.last_error is not None
    assert asyncio.run(find_latest_checkpoint(storage)).step == 1


def test_unloadable_payload_raises_bad_checkpoint(
    tmp_path: Path, background: BackgroundLoop
) -> None:
    storage = LocalStorage(tmp_path)
    asyncio.run(write_checkpoint(storage, 4, b"\x80\x02 definitely not torch"))

    with pytest.raises(BadCheckpoint) as caught:
        CheckpointManager(storage, background).restore_latest()

    assert "step 4" in str(caught.value)
    assert "cannot be loaded" in str(caught.value)


def test_pickled_object_rejected_by_weights_only(
    tmp_path: Path, background: BackgroundLoop
) -> None:
    import io

    buffer = io.BytesIO()
    torch.save({"path": Path("/etc")}, buffer)  # not a tensor or plain type
    storage = LocalStorage(tmp_path)
    asyncio.run(write_checkpoint(storage, 8, buffer.getvalue()))

    with pytest.raises(BadCheckpoint):
        CheckpointManager(storage, background).restore_latest()


def test_manifest_json_fields(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    ref = asyncio.run(write_checkpoint(storage, 12, b"abc"))

    manifest = json.loads((tmp_path / protocol.checkpoint_prefix(12) / MANIFEST).read_text())

    assert manifest["step"] == 12
    assert manifest["size_bytes"] == 3
    assert manifest["sha256"] == ref.sha256
    assert manifest["payload"] == PAYLOAD
    assert manifest["created_at"] > 0


def _wait_until(condition, timeout_s: float = 10) -> None:
    event = threading.Event()
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        event.wait(0.01)
    raise AssertionError("condition not met in time")


def cuda_tagged_payload(state: dict, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """Serialize state as a GPU machine would: every storage tagged for cuda:0."""
    import io

    buffer = io.BytesIO()
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, buffer)
    return buffer.getvalue()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("map_location", [None, "cpu"])
def test_gpu_checkpoint_loads_on_cpu(
    tmp_path: Path, background: BackgroundLoop, monkeypatch: pytest.MonkeyPatch, map_location
) -> None:
    import io

    state = {"weights": torch.arange(6.0).reshape(2, 3), "bias": torch.tensor([0.5, -1.5])}
    payload = cuda_tagged_payload(state, monkeypatch)
    storage = LocalStorage(tmp_path)
    asyncio.run(write_checkpoint(storage, 12, payload))

    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(io.BytesIO(payload), weights_only=True)
    restored = CheckpointManager(storage, background).restore_latest(map_location)

    assert restored is not None
    assert restored[0].step == 12
    for name, tensor in state.items():
        assert restored[1][name].device.type == "cpu"
        assert torch.equal(restored[1][name], tensor)
