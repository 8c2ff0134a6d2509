"""The worker image's Dockerfile, parsed (Docker cannot build in the test environment)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from worker import cli

ROOT = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    parsed = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            parsed.append((keyword.upper(), rest.strip()))
    return parsed


def values(keyword: str) -> list[str]:
    return [rest for key, rest in instructions() if key == keyword]


def test_entrypoint_is_exec_form_behind_tini() -> None:
    entrypoints = values("ENTRYPOINT")

    assert len(entrypoints) == 1
    assert json.loads(entrypoints[0]) == ["/usr/bin/tini", "--", "gpujobs-worker"]
    assert json.loads(values("CMD")[-1]) == ["train-digits"]


def test_tini_installed() -> None:
    assert any(re.search(r"apt-get install .*\btini\b", run) for run in values("RUN"))


def test_entry_point_script_exists() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())

    assert pyproject["project"]["scripts"]["gpujobs-worker"] == "worker.cli:main"
    assert callable(cli.main)
    assert cli.build_parser().parse_args(["train-digits"]).command == "train-digits"


def test_base_is_pytorch_runtime() -> None:
    assert re.fullmatch(r"pytorch/pytorch:2\.\S+-cuda12\.\S+-runtime", values("FROM")[0])


def test_runs_as_non_root() -> None:
    users = values("USER")

    assert users
    assert users[-1] not in ("root", "0")


def test_copies_worker_only() -> None:
    copied = " ".join(values("COPY"))

    assert "worker/" in copied
    assert "gpujobs/" not in copied
    assert "journal/" not in copied


def test_no_secrets_in_image() -> None:
    text = (ROOT / "Dockerfile").read_text()

    assert not re.search(r"(TOKEN|SECRET|API_KEY|PASSWORD|AWS_ACCESS)\s*[=\s]", text, re.I)
