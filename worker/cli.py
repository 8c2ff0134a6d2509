"""`gpujobs-worker`: train-digits (the example job, on one or several GPUs), infer-digits
(resumable batch inference) and run (wrapper mode for any command)."""

from __future__ import annotations

import argparse
import logging
import sys

from worker import protocol
from worker.config import WorkerConfig
from worker.distributed import RankInfo, launch_ranks, write_rank_exit_code
from worker.errors import ConfigError
from worker.logs import setup_logging
from worker.storage import StorageError, StorageUnavailable

logger = logging.getLogger("worker.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpujobs-worker",
        description="Resumable training worker; configured by GPUJOBS_* environment variables.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train-digits", help="train the digits example job, resuming if possible"
    )
    train.add_argument(
        "--nproc",
        type=int,
        default=None,
        help=f"processes (one per GPU) to run under torchrun; default ${protocol.ENV_NUM_GPUS} or 1",
    )
    commands.add_parser(
        "infer-digits",
        help="run the digits model over input shards, resuming after the last finished shard",
    )
    run = commands.add_parser(
        "run",
        help="run CMD as a child with checkpoint sync: gpujobs-worker run -- CMD ARGS",
    )
    run.add_argument("child", nargs=argparse.REMAINDER, help="the command to run, after --")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code (see worker.protocol)."""
    args = build_parser().parse_args(argv)
    rank = RankInfo.from_env()
    capture = setup_logging(prefix=f"[rank {rank.rank}] " if rank and rank.rank else "")
    try:
        config = WorkerConfig.from_env()
    except ConfigError as exc:
        logger.error("%s", exc)
        return protocol.EXIT_BAD_CONFIG
    if args.command == "train-digits":
        return _train_digits(config, capture, rank, args.nproc or config.num_gpus)
    if args.command == "infer-digits":
        return _run_session(config, capture, "infer-digits", None)
    child = args.child[1:] if args.child[:1] == ["--"] else args.child
    if not child:
        logger.error("missing command: use gpujobs-worker run -- CMD ARGS")
        return protocol.EXIT_BAD_CONFIG
    return _run_session(config, capture, "run", child)


def _train_digits(config: WorkerConfig, capture, rank: RankInfo | None, nproc: int) -> int:
    if rank is not None:
        from worker.train_distributed import run_rank

        return write_rank_exit_code(rank, run_rank(config, capture, rank))
    if nproc > 1:
        return launch_ranks(nproc, ["worker.cli", "train-digits"], config.grace_period_s)
    return _run_session(config, capture, "train-digits", None)


def _run_session(config: WorkerConfig, capture, command: str, child: list[str] | None) -> int:
    from worker.session import WorkerSession

    try:
        session = WorkerSession(config, capture)
    except StorageError as exc:
        logger.error("cannot open the artifact storage: %s", exc)
        return protocol.EXIT_BAD_CONFIG
    with session.preemption:
        try:
            session.preflight()
            return _dispatch(session, command, child)
        except protocol.InvalidCompletionMarker as exc:
            message = f"{exc}: fix or delete {protocol.COMPLETION_MARKER} in {config.artifact_uri}"
            return session.fail(message, protocol.EXIT_BAD_CHECKPOINT)
        except StorageUnavailable as exc:
            return session.fail(f"artifact storage unavailable: {exc}")
        except StorageError as exc:
            return session.fail(f"artifact storage failed: {exc}")
        except Exception as exc:
            logger.exception("worker crashed")
            return session.fail(f"worker crashed: {exc!r}")
        finally:
            session.close()


def _dispatch(session, command: str, child: list[str] | None) -> int:
    if command == "train-digits":
        from worker.train_digits import run_digits_job

        return run_digits_job(session)
    if command == "infer-digits":
        from worker.infer_digits import run_inference_job

        return run_inference_job(session)
    from worker.wrapper import run_wrapped

    assert child is not None
    return run_wrapped(session, child)


if __name__ == "__main__":
    sys.exit(main())
