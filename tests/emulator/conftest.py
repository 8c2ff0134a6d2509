"""Fixtures for the emulator tests: a started emulator and a client with no pacing."""

from __future__ import annotations

import pytest

from gpujobs.emulator import Emulator
from emu_helpers import client_for


@pytest.fixture(autouse=True)
def no_real_api(monkeypatch, tmp_path):
    """Keep the real key, URL and key files out of every test."""
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    monkeypatch.delenv("VAST_URL", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
async def emulator(tmp_path):
    # At 3600 emulated seconds per real second, loading takes 0.2 real seconds and a user
    # stop grants 1 real second of grace.
    emu = Emulator(seed=21, loading_s=720.0, rate_limits=False, workdir=tmp_path / "emu",
                   time_scale=3600.0, stop_grace_s=3600.0, logs_ready_s=1080.0)
    await emu.start()
    yield emu
    await emu.stop()


@pytest.fixture
async def vast(emulator):
    client = client_for(emulator)
    yield client
    await client.close()
