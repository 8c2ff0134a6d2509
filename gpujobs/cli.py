"""The `gpujobs` command line: parses arguments, then calls functions tests can call directly.

Expected errors print one line that names what is wrong and what to do, and exit with 2.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from gpujobs.cli_console import console
from gpujobs.errors import ConfigError, GpujobsError
from gpujobs.settings import Settings, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run GPU training jobs on Vast.ai that survive preemption.")

from gpujobs import cli_cost, cli_offers  # noqa: E402  (commands that live in their own module)
from gpujobs.cli_audit import audit_app  # noqa: E402
from gpujobs.cli_data import data_app  # noqa: E402
from gpujobs.cli_logs import logs  # noqa: E402
from gpujobs.cli_profiles import profiles_app  # noqa: E402

app.add_typer(audit_app, name="audit")
app.add_typer(profiles_app, name="profiles")
app.command("offers")(cli_offers.offers)
app.command("cost-report")(cli_cost.cost_report)
app.command("logs")(logs)
app.add_typer(data_app, name="data")

EXIT_USAGE = 2


def _settings() -> Settings:
    return load_settings()


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=False, default=str))


@app.command()
def demo(
    json_output: bool = typer.Option(False, "--json", help="Print one JSON summary object."),
    total_steps: int = typer.Option(600, help="Training steps of the digits job."),
    step_delay_s: float = typer.Option(0.02, help="Pause after each step, in seconds."),
) -> None:
    """Run a digits training job on the local emulator, preempt it once, and resume it."""
    from gpujobs.demo import DemoOptions, print_transitions, run_demo

    say = (lambda line: None) if json_output else typer.echo
    if not json_output:
        print_transitions()
    options = DemoOptions(total_steps=total_steps, step_delay_s=step_delay_s)
    summary = asyncio.run(run_demo(options, say))
    if json_output:
        _print_json(summary)
        return
    typer.echo("")
    typer.echo(f"job {summary['job_id']}: {summary['state']} after {summary['attempts']} attempts"
               f" and {summary['preemptions']} preemption")
    typer.echo(f"  states visited: {' -> '.join(summary['states_visited'])}")
    last = summary["last_checkpoint_step_before_preemption"]
    if last is not None and last > summary["checkpoint_step_at_preemption"]:
        typer.echo(f"  preempted at step {summary['preempted_at_step']}, with the last checkpoint "
                   f"at step {summary['checkpoint_step_at_preemption']}; the worker saved an "
                   f"emergency checkpoint at step {last} within its grace period")
    typer.echo(f"  last durable checkpoint before the preemption: step "
               f"{summary['last_checkpoint_step_before_preemption']}; resumed from step "
               f"{summary['resumed_from_step']}")
    typer.echo(f"  held-out accuracy: {summary['test_accuracy']:.4f}")
    typer.echo(f"  cost: ${summary['cost_usd']:.6f} (emulator billed "
               f"${summary['emulator_charges_usd']:.6f}); instances alive: "
               f"{summary['instances_alive_at_end']}")
    typer.echo(f"  replay it: {summary['replay_command']}")


@app.command()
def submit(
    spec_file: Optional[Path] = typer.Argument(None, help="Job spec YAML file."),
    profile: Optional[str] = typer.Option(None, help="GPU profile name (see `gpujobs profiles`)."),
    name: Optional[str] = typer.Option(
        None, help="Job name, used as the prefix of its id (default: digits)."),
    team: Optional[str] = typer.Option(
        None, help="Team the job is billed to (default: default)."),
    project: Optional[str] = typer.Option(
        None, help="Project the job is billed to (default: default)."),
    total_steps: Optional[int] = typer.Option(None, min=1, help="Training steps (default: 600)."),
    env: Optional[str] = typer.Option(
        None, "--env", help="Environment whose profile overrides apply (default: GPUJOBS_ENV)."),
    json_output: bool = typer.Option(False, "--json"),
) -> None:
    """Submit a job; a running `gpujobs supervise` picks it up.

    With a spec file, the options given replace the file's values.
    """
    from gpujobs.jobs import submit as submit_job
    from gpujobs.jobspec import JobSpec, check_name, load_spec
    from gpujobs.profiles import environment_from

    options = {"profile": profile, "name": name, "team": team, "project": project,
               "total_steps": total_steps}
    overrides = {key: value for key, value in options.items() if value is not None}
    for key, label in (("name", "job name"), ("team", "team"), ("project", "project")):
        if key in overrides:
            check_name(overrides[key], label)
    if spec_file is not None:
        spec = load_spec(spec_file, overrides)
    elif profile is None:
        raise GpujobsError("give a job spec file or --profile NAME (see `gpujobs profiles`)")
    else:
        spec = JobSpec(**{"name": "digits", **overrides})
    settings = _settings().replace(env=environment_from(env))
    job_id = asyncio.run(submit_job(settings, spec))
    if json_output:
        _print_json({"job_id": job_id, "state": "queued"})
    else:
        typer.echo(job_id)


@app.command()
def status(
    job_id: Optional[str] = typer.Argument(None, help="Show only this job."),
    json_output: bool = typer.Option(False, "--json"),
) -> None:
    """List jobs with their state, progress and cost."""
    from gpujobs.cli_status import status_table
    from gpujobs.jobs import journal_exists, list_jobs

    settings = _settings()
    jobs = asyncio.run(list_jobs(settings, job_id))
    if json_output:
        _print_json([j.to_dict() for j in jobs])
        return
    if not jobs and not journal_exists(settings):
        typer.echo(f"no jobs: no journal at {settings.journal_path} yet; submit a job first, or "
                   "set GPUJOBS_HOME to the folder that contains journal.db", err=True)
        return
    output = console()
    output.print(status_table(jobs, output.width))


@app.command()
def cancel(job_id: str = typer.Argument(..., help="Job to cancel.")) -> None:
    """Cancel a job: the supervisor destroys its instances and ends it as cancelled."""
    from gpujobs.jobs import cancel as cancel_job

    state = asyncio.run(cancel_job(_settings(), job_id))
    if state.is_terminal:
        typer.echo(f"job {job_id} is already {state.value}; nothing to cancel")
    else:
        typer.echo(f"cancel requested for job {job_id} (was {state.value})")


@app.command()
def replay(
    job: Optional[str] = typer.Option(None, "--job", help="Job id to replay."),
    at: Optional[str] = typer.Option(None, help="Show the job as of this time (ISO 8601 or epoch)."),
    all_jobs: bool = typer.Option(False, "--all", help="Replay every job."),
    check: bool = typer.Option(False, help="With --all: compare the stored projections."),
    json_output: bool = typer.Option(False, "--json"),
) -> None:
    """Rebuild a job's history from its events alone and show how it got where it is."""
    from gpujobs.cli_replay import replay_command

    replay_command(_settings(), job, at, all_jobs, check, json_output)


@app.command()
def supervise(
    tick_s: float = typer.Option(5.0, help="Seconds between reconcile passes."),
    pacing_scale: float = typer.Option(
        1.0, help="Multiplier of the client's per-endpoint request intervals; 0 turns pacing "
        "off (only for the local emulator)."),
    intent_timeout_s: float = typer.Option(
        60.0, help="Seconds a create with an unknown outcome may take to appear in the "
        "instance list before its attempt is given up."),
    settle_delay_s: float = typer.Option(
        300.0, help="Seconds after a destroy before the instance's cost is settled against "
        "the provider's charges."),
    settle_interval_s: float = typer.Option(
        60.0, help="Minimum seconds between two queries of the charges endpoint."),
    env: Optional[str] = typer.Option(
        None, "--env", help="Environment whose budget overrides apply (default: GPUJOBS_ENV)."),
) -> None:
    """Run the supervisor for this journal until interrupted."""
    from gpujobs.cli_supervise import supervise_command
    from gpujobs.profiles import environment_from

    for flag, value in (("--tick-s", tick_s), ("--intent-timeout-s", intent_timeout_s)):
        if not 0 < value < math.inf:  # also False for nan
            raise GpujobsError(f"invalid {flag} {value}; use a finite number of seconds above 0")
    for flag, value in (("--pacing-scale", pacing_scale), ("--settle-delay-s", settle_delay_s),
                        ("--settle-interval-s", settle_interval_s)):
        if not 0 <= value < math.inf:
            raise GpujobsError(f"invalid {flag} {value}; use a finite number, 0 or more")
    settings = _settings().replace(tick_s=tick_s, settle_delay_s=settle_delay_s,
                                   settle_interval_s=settle_interval_s,
                                   env=environment_from(env))
    supervise_command(settings, pacing_scale=pacing_scale, intent_timeout_s=intent_timeout_s)


@app.command()
def emulator(
    port: int = typer.Option(0, help="Port on 127.0.0.1; 0 picks a free one."),
    seed: int = typer.Option(0, help="Seed of the emulated market and of random faults."),
    faults: Optional[Path] = typer.Option(None, help="Fault plan file (YAML or JSON)."),
    api_key: Optional[str] = typer.Option(None, help="Key to accept; generated if omitted."),
    time_scale: float = typer.Option(
        1.0, help="Emulated seconds per real second, for billing and every emulated delay."),
    loading_s: float = typer.Option(2.0, help="Emulated seconds an instance stays loading."),
    preempt_after: Optional[float] = typer.Option(
        None, help="Preempt every instance this many emulated seconds after it runs."),
    preempt_grace: float = typer.Option(
        5.0, help="Emulated seconds between SIGTERM and SIGKILL on preemption."),
    hard_kill: bool = typer.Option(False, help="Preempt with SIGKILL alone, no SIGTERM."),
    offline_after: Optional[float] = typer.Option(
        None, help="Drop every host (status offline) this many emulated seconds after start."),
    unknown_after: Optional[float] = typer.Option(
        None, help="Stop every host's heartbeat (status unknown) after this many seconds."),
    fail_rate: Optional[float] = typer.Option(
        None, help="Share of API requests (0 to 1) that fail with HTTP 503."),
    slow_s: Optional[float] = typer.Option(
        None, help="Real seconds added before every API response."),
    vanish_rate: Optional[float] = typer.Option(
        None, help="Chance (0 to 1) that an offer is taken just before a create."),
) -> None:
    """Run the local Vast.ai emulator until interrupted; fault flags add to --faults."""
    from gpujobs.emulator import EmulatorError, serve
    from gpujobs.emulator.faults import rules_from_flags

    try:
        rules = rules_from_flags(
            preempt_after_s=preempt_after, preempt_grace_s=preempt_grace, hard_kill=hard_kill,
            offline_after_s=offline_after, unknown_after_s=unknown_after, fail_rate=fail_rate,
            slow_s=slow_s, vanish_rate=vanish_rate,
        )
        asyncio.run(serve(port=port, seed=seed, faults_path=faults, api_key=api_key,
                          time_scale=time_scale, loading_s=loading_s, extra_rules=rules))
    except EmulatorError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = app(standalone_mode=False)
    except (GpujobsError, ConfigError) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except Exception as exc:  # noqa: BLE001 - library errors with their own clear messages
        if _is_expected(exc):
            typer.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USAGE)
        raise
    # Without standalone mode, click returns the code of typer.Exit instead of exiting.
    if isinstance(code, int) and code:
        sys.exit(code)


def _click_exception_types() -> tuple[type[Exception], ...]:
    """Return the ClickException classes that the parser may raise.

    typer 0.29 parses with its own copy of click (typer._click), whose exceptions do not derive
    from the click package's, so both are checked. The copy's class is found through a public
    typer class rather than by importing the private module.
    """
    import click

    vendored = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    return (click.ClickException, vendored)


def _is_expected(exc: Exception) -> bool:
    import click

    from journal import JournalError
    from gpujobs.vast.errors import VastError

    if isinstance(exc, (click.exceptions.Exit, typer.Exit)):
        sys.exit(exc.exit_code)
    if isinstance(exc, (click.exceptions.Abort, typer.Abort)):
        sys.exit(130)
    if isinstance(exc, _click_exception_types()):
        exc.show()
        sys.exit(exc.exit_code)
    return isinstance(exc, (JournalError, VastError))


if __name__ == "__main__":
    main()
