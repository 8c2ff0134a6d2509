"""Long crash torture: hundreds of SIGKILLs of `gpujobs supervise`, then the invariant checks.

    python bench/torture.py                          # 200 kills, seed 0 (15-20 min, 2 cores)
    python bench/torture.py --kills 20 --seed 5      # a quick one
    python bench/torture.py --json                   # print the summary as JSON

The supervisors, CLI commands and workers run on a copy of the packages taken at the start, so
edits to the working tree during the run do not reach them. Exits 1 when any invariant is
broken. Every violation is printed, with the folder that keeps the journal, the emulator's
instance folders and the supervisor's log (`--keep` keeps it also after a clean run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.torture import TortureConfig, TortureReport, run_torture  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=200, help="SIGKILLs of the supervisor")
    parser.add_argument("--jobs", type=int, default=20,
                        help="minimum number of jobs; more are submitted while kills remain")
    parser.add_argument("--in-flight", type=int, default=3, help="jobs running at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-steps", type=int, default=150)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--cancel-fraction", type=float, default=0.1,
                        help="share of jobs cancelled while they run")
    parser.add_argument("--kill-gap", type=float, nargs=2, default=(0.3, 3.0),
                        metavar=("MIN_S", "MAX_S"), help="random pause before a kill")
    parser.add_argument("--targeted-share", type=float, default=0.4,
                        help="share of kills that wait for a create or destroy in flight")
    parser.add_argument("--no-chaos", action="store_true",
                        help="no preemptions, offline hosts or error bursts; kills only")
    parser.add_argument("--vanish-probability", type=float, default=0.02,
                        help="chance that an offer is taken by someone else before a create")
    parser.add_argument("--settle-timeout", type=float, default=300.0,
                        help="seconds the last supervisor gets to finish every job")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for the run's files (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the folder after a clean run")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each kill and fault")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> TortureConfig:
    return replace(
        TortureConfig(), seed=args.seed, kills=args.kills, jobs=args.jobs,
        max_jobs_in_flight=args.in_flight, total_steps=(args.min_steps, args.max_steps),
        cancel_fraction=args.cancel_fraction, kill_gap_s=tuple(args.kill_gap),
        targeted_kill_share=args.targeted_share, chaos=not args.no_chaos,
        offer_vanish_probability=args.vanish_probability,
        settle_timeout_s=args.settle_timeout, snapshot=True,
    )


def print_report(report: TortureReport) -> None:
    summary = report.summary()
    print(f"seed {summary['seed']}: {summary['kills']} kills {summary['kill_modes']}, "
          f"{summary['jobs']} jobs {summary['final_states']}, {summary['instances']} "
          f"instances, {summary['duration_s']} s")
    print(f"live-instance samples: {summary['samples']}, max live per job: "
          f"{summary['max_live_per_job']}; chaos: {summary['chaos']}")
    print(f"cost: journal ${summary['journal_usd']:.6f}, emulator ${summary['emulator_usd']:.6f},"
          f" gap {summary['cost_gap']:+.3%} (largest per instance "
          f"{summary['max_instance_gap']:+.3%})")
    print(f"audit verify: {report.audit_output.splitlines()[-1] if report.audit_output else '-'}")
    print(f"replay --all --check: "
          f"{report.replay_output.splitlines()[-1] if report.replay_output else '-'}")
    for text in summary["violations"]:
        print(f"VIOLATION: {text}")
    print("all invariants hold" if not summary["violations"] else
          f"{len(summary['violations'])} violations; files in {report.home}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpujobs-torture-"))
    report = asyncio.run(run_torture(config_from(args), workdir))
    if args.json:
        print(json.dumps(report.summary(), indent=2))
    else:
        print_report(report)
    failed = bool(report.violations())
    if not failed and not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
