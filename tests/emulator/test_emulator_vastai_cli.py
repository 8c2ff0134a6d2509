"""The official ``vastai`` CLI (1.9.1 from PyPI) pointed at the emulator, run as subprocesses.

The CLI lives in its own virtual environment because its pins conflict with this project's:
``$GPUJOBS_VASTAI_VENV`` or ``<repo>/.venv-vastai``, created on first use.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpujobs.vast import parse_query

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[2]
VASTAI_VERSION = "1.9.1"


@pytest.fixture(scope="session")
def vastai_venv() -> Path:
    """Create or reuse the CLI's virtual environment; skip when pip cannot install it."""
    venv = Path(os.environ.get("GPUJOBS_VASTAI_VENV", REPO / ".venv-vastai"))
    python = venv / "bin" / "python"
    if not (venv / "bin" / "vastai").exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                           capture_output=True, timeout=300)
            subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                            f"vastai=={VASTAI_VERSION}"], check=True, capture_output=True,
                           timeout=500)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            output = getattr(exc, "stderr", b"") or b""
            pytest.skip(f"cannot install vastai=={VASTAI_VERSION} into {venv}: {exc} "
                        f"{output.decode(errors='replace')[-300:]}")
    return venv


@pytest.fixture
def cli_env(tmp_path, emulator) -> dict[str, str]:
    """Environment for the CLI: a scratch home and VAST_URL, which it also reads on import."""
    home = tmp_path / "cli-home"
    env = {key: value for key, value in os.environ.items() if not key.startswith("VAST")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / "config"),
               XDG_CACHE_HOME=str(home / "cache"), XDG_STATE_HOME=str(home / "state"),
               VAST_URL=emulator.url, VASTAI_NO_UPDATE_CHECK="1")
    return env


async def vastai(venv: Path, env: dict, emulator, *args: str, key: str | None = None):
    """Run ``vastai --url URL --api-key KEY --raw ARGS``; return (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        str(venv / "bin" / "vastai"), "--url", emulator.url,
        "--api-key", key or emulator.api_key, "--raw", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        stdin=asyncio.subprocess.DEVNULL,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    return process.returncode, stdout.decode(), stderr.decode()


async def test_cli_search_offers(vastai_venv, cli_env, emulator):
    code, out, err = await vastai(vastai_venv, cli_env, emulator, "search", "offers",
                                  "gpu_name=RTX_4090 num_gpus=1 dph<=0.25", "-o", "dph",
                                  "--limit", "5")
    assert code == 0, err
    offers = json.loads(out)
    assert len(offers) == 5
    assert {offer["gpu_name"] for offer in offers} == {"RTX 4090"}
    prices = [offer["dph_total"] for offer in offers]
    assert prices == sorted(prices)
    assert all(price <= 0.25 for price in prices)
    assert emulator.request_count("POST /bundles/") == 1


async def test_cli_instance_lifecycle(vastai_venv, cli_env, emulator):
    code, out, err = await vastai(vastai_venv, cli_env, emulator, "search", "offers",
                                  "num_gpus=1", "-o", "dph", "--limit", "1")
    assert code == 0, err
    offer_id = json.loads(out)[0]["id"]

    code, out, err = await vastai(vastai_venv, cli_env, emulator, "create", "instance",
                                  str(offer_id), "--image", "python:3.11", "--label", "cli",
                                  "--onstart-cmd", "echo hello-from-cli; sleep 60")
    assert code == 0, err
    created = json.loads(out)
    assert created["success"] is True
    instance_id = created["new_contract"]

    for _ in range(100):
        code, out, err = await vastai(vastai_venv, cli_env, emulator, "show", "instance",
                                      str(instance_id))
        assert code == 0, err
        if json.loads(out)["actual_status"] == "running":
            break
    assert json.loads(out)["label"] == "cli"

    code, out, err = await vastai(vastai_venv, cli_env, emulator, "show", "instances")
    assert code == 0, err
    assert [row["id"] for row in json.loads(out)] == [instance_id]

    code, out, err = await vastai(vastai_venv, cli_env, emulator, "logs", str(instance_id))
    assert code == 0, err
    assert "hello-from-cli" in out

    code, out, err = await vastai(vastai_venv, cli_env, emulator, "destroy", "instance",
                                  str(instance_id), "-y")
    assert code == 0, err
    code, out, err = await vastai(vastai_venv, cli_env, emulator, "show", "instance",
                                  str(instance_id))
    assert json.loads(out) == {"instances": None}
    assert emulator.live_instance_ids() == []


async def test_cli_wrong_key_reports_401(vastai_venv, cli_env, emulator):
    code, out, err = await vastai(vastai_venv, cli_env, emulator, "show", "instances",
                                  key="wrong-key")
    assert json.loads(err.strip().splitlines()[-1]) == {
        "error": True, "status_code": 401, "msg": "Invalid user key"}


QUERIES = [
    "gpu_name=RTX_4090 num_gpus=1 reliability>0.98",
    "gpu_name in [RTX_4090,H100_SXM] gpu_ram>=24",
    "num_gpus>=2 dph<0.5 cpu_ram>64 duration>=3",
    "driver_version>=535.86.05 cuda_vers>=12.1 static_ip=true cluster_id=null",
    "gpu_name not in [RTX_3090] geolocation=\"Oregon,_US\" verified=any",
    "dlperf_usd>10 flops_usd>5 num_gpus nin [1,2] inet_down!=100",
]


async def test_parse_query_matches_cli(vastai_venv, tmp_path):
    program = (
        "import json, sys\n"
        "from vastai.api.query import parse_query, offers_fields, offers_alias, offers_mult\n"
        "for text in json.load(sys.stdin):\n"
        "    print(json.dumps(parse_query(text, {}, offers_fields, offers_alias, offers_mult)))\n"
    )
    process = await asyncio.create_subprocess_exec(
        str(vastai_venv / "bin" / "python"), "-c", program, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={"HOME": str(tmp_path), "PATH": os.environ["PATH"]},
    )
    stdout, _ = await process.communicate(json.dumps(QUERIES).encode())
    theirs = stdout.decode().splitlines()
    assert len(theirs) == len(QUERIES)
    for text, expected in zip(QUERIES, theirs):
        assert json.dumps(parse_query(text, defaults=False)) == expected, text
