"""`gpujobs profiles`: list the GPU profiles in effect, or validate a profiles file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from gpujobs.cli_console import console
from gpujobs.profiles import (
    Profile, environment_from, load_profiles, load_profiles_file, read_profiles_file,
)
from gpujobs.settings import load_settings

profiles_app = typer.Typer(invoke_without_command=True, help="List or validate GPU profiles.")

ENV_HELP = "Environment whose overrides apply (default: GPUJOBS_ENV)."


def profiles_in_effect(env: str | None) -> dict[str, Profile]:
    """Profiles from every config folder in order, with `env` (or GPUJOBS_ENV) applied."""
    from gpujobs.errors import GpujobsError

    settings = load_settings()
    files = settings.profile_files()
    if not files:
        raise GpujobsError(
            "no gpu_profiles.yaml found in " + ", ".join(str(d) for d in settings.config_dirs)
            + "; set GPUJOBS_CONFIG_DIR to a folder that has one"
        )
    return load_profiles(files, env=environment_from(env))


def profile_rows(found: dict[str, Profile]) -> list[dict[str, Any]]:
    return [profile.to_dict() for profile in found.values()]


@profiles_app.callback()
def profiles(
    ctx: typer.Context,
    json_output: bool = typer.Option(False, "--json", help="Print the profiles as JSON."),
    env: Optional[str] = typer.Option(None, "--env", help=ENV_HELP),
) -> None:
    """List the GPU profiles in effect."""
    if ctx.invoked_subcommand is not None:
        return
    found = profiles_in_effect(env)
    if json_output:
        typer.echo(json.dumps({name: p.to_dict() for name, p in found.items()}, indent=2))
        return
    table = Table("profile", "gpu", "gpus", "max $/h", "reliability >=", "max hours", "type",
                  "extra filters")
    for p in found.values():
        kind = "interruptible" if p.interruptible else "on-demand"
        if p.interruptible:
            kind += f" (+{p.bid_margin:.0%} bid, {p.on_preemption} when outbid)"
        table.add_row(p.name, "/".join(p.gpu_names), str(p.num_gpus), f"{p.max_dph:.2f}",
                      f"{p.reliability_min:.2f}", f"{p.max_duration_hours:g}", kind,
                      p.extra_filters)
    console().print(table)


@profiles_app.command("validate")
def profiles_validate(
    path: Path = typer.Argument(..., help="A gpu_profiles.yaml or budgets.yaml to check."),
) -> None:
    """Check a profiles or budgets file and each of its environments; report the first problem."""
    if _is_budgets_file(path):
        typer.echo(_validate_budgets(path))
        return
    found = load_profiles_file(path)
    environments = sorted(read_profiles_file(path).environments)
    for env in environments:
        load_profiles_file(path, env=env)
    line = f"ok: {len(found)} profiles in {path}: {', '.join(found)}"
    if environments:
        line += f"; environments: {', '.join(environments)}"
    typer.echo(line)


def _is_budgets_file(path: Path) -> bool:
    """Return True for a file with budgets.yaml's keys, at the top or in an environment."""
    from gpujobs.yamlfile import Located, load_yaml

    budget_keys = {"budgets", "on_exceeded"}
    document = load_yaml(path)
    if not isinstance(document, Located) or "profiles" in document.values:
        return False
    if budget_keys & set(document.values):
        return True
    environments = document.values.get("environments")
    if not isinstance(environments, Located):
        return False
    return any(isinstance(body, Located) and budget_keys & set(body.values)
               for body in environments.values.values())


def _validate_budgets(path: Path) -> str:
    from gpujobs.budgets import load_budgets, read_budgets_file

    found = read_budgets_file(path)
    environments = sorted(found.environments)
    for env in environments:
        load_budgets([path], env=env)
    line = f"ok: {len(found.budgets)} budgets in {path}"
    if environments:
        line += f"; environments: {', '.join(environments)}"
    return line
