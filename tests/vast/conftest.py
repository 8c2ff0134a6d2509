"""Fixtures for the Vast.ai client tests: an emulator on 127.0.0.1 and fast clients."""

from __future__ import annotations

import os

import pytest

from gpujobs.emulator import Emulator
from vast_helpers import fast_client


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Keep real keys and URLs out: no $VAST_API_KEY, $VAST_URL or key files from $HOME."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    if os.environ.get("GPUJOBS_LIVE_VAST") != "1":
        monkeypatch.delenv("VAST_API_KEY", raising=False)
    monkeypatch.delenv("VAST_URL", raising=False)
    return home


@pytest.fixture
async def emulator(tmp_path):
    emu = Emulator(seed=7, loading_s=0.2, rate_limits=False, workdir=tmp_path / "emu")
    await emu.start()
    yield emu
    await emu.stop()


@pytest.fixture
async def client(emulator):
    vast = fast_client(emulator)
    yield vast
    await vast.close()
