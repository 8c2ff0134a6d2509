"""Strict validation of gpu_profiles.yaml, environments, and the `profiles` commands."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpujobs.cli_profiles import profiles_app
from gpujobs.errors import ConfigError
from gpujobs.profiles import environment_from, load_profiles, offer_query
from gpujobs.settings import SHIPPED_CONFIG_DIR

BASE = """\
profiles:
  small:
    gpu_name: RTX_4090
    num_gpus: 1
    max_dph: 0.25
    reliability_min: 0.9
    max_duration_hours: 2
"""
KEYS = ("bid_margin, description, disk_gb, extra_filters, gpu_name, image, interruptible, "
        "loading_timeout_s, max_dph, max_duration_hours, max_restarts, num_gpus, on_preemption, "
        "reliability_min, resume_wait_s")


def write(tmp_path: Path, text: str, name: str = "gpu_profiles.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path, env: str | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_profiles([path], env=env)
    return str(caught.value)


ERROR_CASES = [
    ("unknown key", BASE + "    colour: red\n",
     "8: profile 'small': colour: unknown key; expected one of: " + KEYS),
    ("duplicate key", BASE + "    max_dph: 0.3\n",
     "8: duplicate key 'max_dph' (first at line 5); keep only one"),
    ("yaml 1.1 boolean", BASE.replace("gpu_name: RTX_4090", "gpu_name: no"),
     "3: profile 'small': gpu_name: expected a non-empty string, got the boolean false "
     "(YAML reads yes/no/on/off as booleans; quote it)"),
    ("quoted number", BASE.replace("max_dph: 0.25", 'max_dph: "0.25"'),
     "5: profile 'small': max_dph: expected a number, got the string '0.25'; remove the quotes"),
    ("out of range", BASE.replace("reliability_min: 0.9", "reliability_min: 1.5"),
     "6: profile 'small': reliability_min: must be at most 1, got 1.5"),
    ("zero price", BASE.replace("max_dph: 0.25", "max_dph: 0"),
     "5: profile 'small': max_dph: must be greater than 0, got 0"),
    ("nan price", BASE.replace("max_dph: 0.25", "max_dph: .nan"),
     "5: max_dph: expected a finite number, got .nan"),
    ("infinite hours", BASE.replace("max_duration_hours: 2", "max_duration_hours: .inf"),
     "7: max_duration_hours: expected a finite number, got .inf"),
    ("infinite wait", BASE + "    resume_wait_s: .inf\n",
     "8: resume_wait_s: expected a finite number, got .inf"),
    ("base 60 hours", BASE.replace("max_duration_hours: 2", "max_duration_hours: 1:30"),
     "7: max_duration_hours: YAML 1.1 reads 1:30 as the base-60 number 90; write 90, or "
     "quote '1:30' for a string"),
    ("octal disk", BASE + "    disk_gb: 010\n",
     "8: disk_gb: YAML 1.1 reads 010 as the octal number 8; write 10 without the leading "
     "zero, or quote '010' for a string"),
    ("fractional gpus", BASE.replace("num_gpus: 1", "num_gpus: 1.5"),
     "4: profile 'small': num_gpus: expected a whole number, got float 1.5"),
    ("too many gpus", BASE.replace("num_gpus: 1", "num_gpus: 65"),
     "4: profile 'small': num_gpus: must be at most 64, got 65"),
    ("not a boolean", BASE + "    interruptible: maybe\n",
     "8: profile 'small': interruptible: expected true or false, got str 'maybe'"),
    ("bad choice", BASE + "    on_preemption: pause\n",
     "8: profile 'small': on_preemption: expected one of migrate, rebid, wait, got str 'pause'"),
    ("wait needs interruptible", BASE + "    on_preemption: wait\n",
     "8: profile 'small': on_preemption: wait applies only to interruptible profiles; set "
     "interruptible: true or use migrate"),
    ("rebid on demand", BASE + "    on_preemption: rebid\n",
     "8: profile 'small': on_preemption: rebid applies only to interruptible profiles; "
     "set interruptible: true or use migrate"),
    ("bad filters", BASE + "    extra_filters: 'inet_down>'\n",
     "8: profile 'small': extra_filters: missing value for field 'inet_down'; write "
     "inet_down>VALUE; use the vastai CLI query form, for example 'inet_down>200 "
     "cuda_vers>=12.1'"),
    ("unknown gpu", BASE.replace("RTX_4090", "RTX_9999"),
     "3: profile 'small': gpu_name: unknown GPU 'RTX_9999'; use a Vast.ai GPU name such as "
     "RTX_4090, H100_SXM or a family such as A100 (`_` stands for a space)"),
    ("missing key", BASE.replace("    max_dph: 0.25\n", ""),
     "3: profile 'small': missing required key 'max_dph'"),
    ("profile not a mapping", "profiles:\n  small: 3\n",
     "2: profile 'small' must be a mapping of settings, got int 3"),
    ("unknown top key", BASE + "profile: {}\n",
     "8: file: profile: unknown key; expected one of: environments, profiles"),
    ("broken yaml", BASE + "  bad: [\n",
     "9: invalid YAML: expected the node content, but found '<stream end>'"),
    ("env override typo", BASE + "environments:\n  dev:\n    profiles:\n      small:\n"
     "        max_dhp: 1\n",
     "12: profile 'small': max_dhp: unknown key; expected one of: " + KEYS),
    ("env override range", BASE + "environments:\n  dev:\n    profiles:\n      small:\n"
     "        max_dph: -1\n",
     "12: profile 'small': max_dph: must be greater than 0, got -1"),
    ("budgets in profiles env", BASE + "environments:\n  dev:\n    budgets: []\n",
     "10: environment 'dev': budgets: belongs in budgets.yaml under environments.dev"),
]


@pytest.mark.parametrize("text, expected", [(t, e) for _, t, e in ERROR_CASES],
                         ids=[name for name, _, _ in ERROR_CASES])
def test_profile_error_message(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    assert error_of(path) == f"{path}:{expected}"


def test_exponent_number_reads_as_float(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("max_dph: 0.25", "max_dph: 25e-2"))
    assert load_profiles([path])["small"].max_dph == 0.25


def test_shipped_profiles_load() -> None:
    profiles = load_profiles([SHIPPED_CONFIG_DIR / "gpu_profiles.yaml"])
    assert profiles["training-standard"].gpu_names == ("A100 PCIE", "A100 SXM4")
    assert profiles["inference-batch"].interruptible is True
    assert profiles["inference-batch"].on_preemption == "rebid"


ENVS = BASE + """\
    extra_filters: inet_down>100
environments:
  dev:
    profiles:
      small:
        max_dph: 0.5
      tiny:
        gpu_name: RTX_3090
        num_gpus: 1
        max_dph: 0.1
        reliability_min: 0.8
        max_duration_hours: 1
  prod:
    profiles:
      small:
        reliability_min: 0.99
"""


def test_environment_overrides_named_keys(tmp_path: Path) -> None:
    path = write(tmp_path, ENVS)
    dev = load_profiles([path], env="dev")
    assert dev["small"].max_dph == 0.5
    assert dev["small"].reliability_min == 0.9  # kept from the base profile
    assert dev["small"].extra_filters == "inet_down>100"
    assert dev["tiny"].gpu_names == ("RTX 3090",)
    prod = load_profiles([path], env="prod")
    assert prod["small"].reliability_min == 0.99
    assert prod["small"].max_dph == 0.25
    assert "tiny" not in prod
    assert load_profiles([path])["small"].max_dph == 0.25


def test_environment_new_profile_must_be_complete(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "environments:\n  dev:\n    profiles:\n      big:\n"
                 "        max_dph: 2\n")
    assert load_profiles([path]).keys() == {"small"}
    assert error_of(path, env="dev") == f"{path}:12: profile 'big': missing required key 'gpu_name'"


def test_environment_override_applies_across_files(tmp_path: Path) -> None:
    base = write(tmp_path, BASE, "base.yaml")
    override = write(tmp_path, "environments:\n  dev:\n    profiles:\n      small:\n"
                     "        max_duration_hours: 8\n", "user.yaml")
    assert load_profiles([base, override], env="dev")["small"].max_duration_hours == 8


def test_unknown_environment_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, ENVS)
    assert error_of(path, env="staging") == (
        f"environment 'staging' is not defined in {path}; defined: dev, prod; add it under "
        "'environments:' or fix GPUJOBS_ENV / --env"
    )


def test_environment_from_flag_then_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert environment_from(None) is None
    monkeypatch.setenv("GPUJOBS_ENV", "prod")
    assert environment_from(None) == "prod"
    assert environment_from("dev") == "dev"


def test_offer_query_adds_extra_filters(tmp_path: Path) -> None:
    profile = load_profiles([write(tmp_path, ENVS)])["small"]
    query = offer_query(profile)
    assert query["inet_down"] == {"gt": "100"}
    assert query["gpu_name"] == {"eq": "RTX 4090"}
    assert query["dph_total"] == {"lte": 0.25}


def test_profiles_validate_command(tmp_path: Path) -> None:
    path = write(tmp_path, ENVS)
    result = CliRunner().invoke(profiles_app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"ok: 1 profiles in {path}: small; environments: dev, prod"


def test_profiles_validate_checks_environments(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "environments:\n  dev:\n    profiles:\n      big:\n"
                 "        max_dph: 2\n")
    result = CliRunner().invoke(profiles_app, ["validate", str(path)])
    assert result.exit_code != 0
    assert "profile 'big': missing required key 'gpu_name'" in str(result.exception)


def test_profiles_validate_shipped_budgets() -> None:
    path = Path(__file__).resolve().parents[2] / "config" / "budgets.yaml"
    result = CliRunner().invoke(profiles_app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"ok: 3 budgets in {path}; environments: dev, prod"


def test_profiles_validate_budgets_of_environments_only(tmp_path: Path) -> None:
    path = tmp_path / "budgets.yaml"
    path.write_text("environments:\n  dev:\n    budgets:\n      - team: research\n"
                    "        limit_usd: 5\n        period: day\n")
    result = CliRunner().invoke(profiles_app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"ok: 0 budgets in {path}; environments: dev"


def test_profiles_validate_rejects_bad_budget(tmp_path: Path) -> None:
    path = tmp_path / "budgets.yaml"
    path.write_text("budgets:\n  - team: research\n    limit_usd: .nan\n    period: day\n")
    result = CliRunner().invoke(profiles_app, ["validate", str(path)])
    assert result.exit_code != 0
    assert "limit_usd: expected a finite number, got .nan" in str(result.exception)


def test_profiles_list_json_with_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config"
    config.mkdir()
    write(config, ENVS)
    monkeypatch.setenv("GPUJOBS_CONFIG_DIR", str(config))
    result = CliRunner().invoke(profiles_app, ["--json", "--env", "dev"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert listed["small"]["max_dph"] == 0.5
    assert listed["tiny"]["gpu_names"] == ["RTX 3090"]


def test_profiles_table_lists_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config"
    config.mkdir()
    write(config, ENVS)
    monkeypatch.setenv("GPUJOBS_CONFIG_DIR", str(config))
    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(profiles_app, [])
    assert result.exit_code == 0, result.output
    assert "small" in result.output
    assert "RTX 4090" in result.output


def submitted_profile(home: Path, job_id: str) -> dict:
    """Read the profile that the job's JobSubmitted event recorded in the journal."""
    import asyncio

    from journal import EventStore

    async def read() -> dict:
        store = await EventStore.open(home / "journal.db")
        try:
            events = await store.read_stream(job_id)
        finally:
            await store.close()
        return events[0].data["profile"]

    return asyncio.run(read())


@pytest.mark.parametrize("flag, variable, expected_dph", [
    (["--env", "dev"], None, 0.5),
    (["--env", "dev"], "prod", 0.5),  # the flag wins over GPUJOBS_ENV
    ([], "dev", 0.5),
    ([], None, 0.25),
])
def test_submit_env_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: list[str],
                         variable: str | None, expected_dph: float) -> None:
    from gpujobs.cli import app

    config = tmp_path / "config"
    config.mkdir()
    write(config, ENVS)
    monkeypatch.setenv("GPUJOBS_CONFIG_DIR", str(config))
    if variable is not None:
        monkeypatch.setenv("GPUJOBS_ENV", variable)
    result = CliRunner().invoke(app, ["submit", "--profile", "small", "--json", *flag])
    assert result.exit_code == 0, result.output
    job_id = json.loads(result.output)["job_id"]
    home = Path(os.environ["GPUJOBS_HOME"])
    assert submitted_profile(home, job_id)["max_dph"] == expected_dph


def test_submit_unknown_env_is_rejected(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from gpujobs.cli import app

    config = tmp_path / "config"
    config.mkdir()
    path = write(config, ENVS)
    monkeypatch.setenv("GPUJOBS_CONFIG_DIR", str(config))
    result = CliRunner().invoke(app, ["submit", "--profile", "small", "--env", "staging"])
    assert result.exit_code != 0
    shipped = SHIPPED_CONFIG_DIR / "gpu_profiles.yaml"
    assert str(result.exception) == (
        f"environment 'staging' is not defined in {shipped}, {path}; defined: dev, prod; add "
        "it under 'environments:' or fix GPUJOBS_ENV / --env"
    )


@pytest.mark.parametrize("flag, variable, expected", [
    (["--env", "prod"], None, "prod"),
    (["--env", "prod"], "dev", "prod"),
    ([], "dev", "dev"),
    ([], None, None),
])
def test_supervise_env_flag(monkeypatch: pytest.MonkeyPatch, flag: list[str],
                            variable: str | None, expected: str | None) -> None:
    import gpujobs.cli_supervise
    from gpujobs.cli import app

    if variable is not None:
        monkeypatch.setenv("GPUJOBS_ENV", variable)
    started: list = []
    monkeypatch.setattr(gpujobs.cli_supervise, "supervise_command",
                        lambda settings, **options: started.append(settings))
    result = CliRunner().invoke(app, ["supervise", *flag])
    assert result.exit_code == 0, result.output
    assert [settings.env for settings in started] == [expected]


async def test_supervise_unknown_env_stops(tmp_path: Path) -> None:
    import asyncio
    import subprocess
    import sys

    from gpujobs.emulator import Emulator

    config = tmp_path / "config"
    config.mkdir()
    budgets = write(config, "budgets:\n  - team: lab\n    limit_usd: 5\n    period: day\n"
                    "environments:\n  prod:\n    on_exceeded: reject\n", "budgets.yaml")
    emulator = Emulator(seed=1, rate_limits=False, workdir=tmp_path / "emulator")
    url = await emulator.start()
    env = dict(os.environ, VAST_URL=url, VAST_API_KEY=emulator.api_key,
               GPUJOBS_CONFIG_DIR=str(config))
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gpujobs.cli", "supervise", "--tick-s", "0.2", "--env",
            "staging", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await emulator.stop()
    assert proc.returncode == 2
    shipped = SHIPPED_CONFIG_DIR / "budgets.yaml"
    assert err.decode().splitlines()[-1] == (
        f"error: environment 'staging' is not defined in {shipped}, {budgets}; defined: dev, "
        "prod; add it under 'environments:' or fix GPUJOBS_ENV / --env")
