"""Fixtures shared by the whole suite: a private GPUJOBS_HOME and no real credentials."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep every test away from the user's state and from the real Vast.ai."""
    monkeypatch.setenv("GPUJOBS_HOME", str(tmp_path / "gpujobs-home"))
    for name in ("GPUJOBS_ENV", "GPUJOBS_CONFIG_DIR", "GPUJOBS_ARTIFACT_URI"):
        monkeypatch.delenv(name, raising=False)
    if os.environ.get("GPUJOBS_LIVE_VAST") != "1":
        monkeypatch.delenv("VAST_API_KEY", raising=False)
        monkeypatch.delenv("VAST_URL", raising=False)
