"""Fault rules from command-line flags, on the typer command and the standalone server."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from gpujobs.cli import app
from gpujobs.emulator import FaultPlanError
from gpujobs.emulator.faults import FaultRule, rules_from_flags
from gpujobs.vast import VastClient

from emu_helpers import cheap_offer, raw, start_server, stop_server, wait_for_status


def test_flags_become_rules():
    rules = rules_from_flags(preempt_after_s=30, preempt_grace_s=2, hard_kill=True,
                             offline_after_s=60, unknown_after_s=90, fail_rate=0.1, slow_s=0.5,
                             vanish_rate=0.2)
    assert rules == (
        FaultRule("preempt", instance="all", after_s=30, sigterm=False, grace_s=2),
        FaultRule("offline", instance="all", after_s=60),
        FaultRule("unknown", instance="all", after_s=90),
        FaultRule("burst_5xx", probability=0.1, status=503),
        FaultRule("slow", delay_s=0.5),
        FaultRule("offer_vanishes", probability=0.2),
    )


def test_no_flags_no_rules():
    assert rules_from_flags() == ()


@pytest.mark.parametrize("flags, message", [
    ({"fail_rate": 1.5}, "--fail-rate must be a probability between 0 and 1, got 1.5"),
    ({"vanish_rate": -0.1}, "--vanish-rate must be a probability between 0 and 1, got -0.1"),
    ({"preempt_after_s": -1}, "--preempt-after must be a number of seconds >= 0, got -1"),
    ({"slow_s": -2}, "--slow-s must be a number of seconds >= 0, got -2"),
])
def test_invalid_flag_named(flags, message):
    with pytest.raises(FaultPlanError) as caught:
        rules_from_flags(**flags)
    assert str(caught.value) == message


def test_command_rejects_bad_flag():
    result = CliRunner().invoke(app, ["emulator", "--fail-rate", "2"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: --fail-rate must be a probability between 0 and 1, got 2")


def test_command_rejects_bad_fault_file(tmp_path):
    path = tmp_path / "faults.yaml"
    path.write_text("rules: [{kind: explode}]\n")
    result = CliRunner().invoke(app, ["emulator", "--faults", str(path)])
    assert result.exit_code == 2
    assert "kind 'explode' is invalid" in result.stderr
    assert result.stderr.count("\n") == 1


async def test_command_preempts_from_flag(tmp_path):
    process, banner = await start_server(
        [sys.executable, "-m", "gpujobs.cli", "emulator", "--port", "0", "--seed", "4",
         "--loading-s", "0.1", "--preempt-after", "0.3", "--hard-kill"], tmp_path)
    try:
        assert banner["faults"] == "preempt"
        async with VastClient(banner["key"], base_url=banner["url"]) as vast:
            instance_id = await vast.create_instance(await cheap_offer(vast), image="busybox",
                                                     onstart="exec sleep 60")
            outbid = await wait_for_status(vast, instance_id, "stopped")
        assert outbid.is_outbid
    finally:
        code, rest = await stop_server(process)
    assert code == 0
    assert b"Vast.ai emulator stopped" in rest


async def test_standalone_faults_file_and_flag(tmp_path):
    path = tmp_path / "faults.json"
    path.write_text(json.dumps({"rules": [
        {"kind": "burst_429", "endpoint": "POST /bundles/", "count": 1, "body": "detail"}]}))
    process, banner = await start_server(
        [sys.executable, "-m", "gpujobs.emulator", "--faults", str(path), "--offline-after",
         "0.2", "--loading-s", "0.1", "--api-key", "file-test-key"], tmp_path)
    try:
        assert "key" not in banner
        assert banner["faults"] == "burst_429, offline"
        emulator = ServerAddress(banner["url"], "file-test-key")
        status, content_type, body = await raw(emulator, "POST", "/api/v0/bundles/", json={})
        assert (status, body) == (429, {"detail": "API requests too frequent"})
        assert content_type == "application/json"
        async with VastClient("file-test-key", base_url=banner["url"]) as vast:
            instance_id = await vast.create_instance(await cheap_offer(vast), image="busybox")
            dropped = await wait_for_status(vast, instance_id, "offline")
        assert dropped.host_lost
    finally:
        code, _ = await stop_server(process)
    assert code == 0


class ServerAddress:
    """The two attributes of an emulator that `raw` needs, for a server in another process."""

    def __init__(self, url: str, api_key: str):
        self.url = url
        self.api_key = api_key
