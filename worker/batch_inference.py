"""Resumable batch inference: run a function over numbered input shards, once each.

Each shard's result is stored as outputs/shard-<N>.json before the shard counts as finished;
then the set of finished shards goes into a checkpoint (its step is the number of finished
shards). A restarted attempt restores that set and also counts every shard whose output
object exists, which covers a stop between the output upload and the checkpoint. So a
finished shard is never computed again, and a shard that was being computed when the worker
died is computed by the next attempt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from worker import protocol
from worker.errors import BadCheckpoint

logger = logging.getLogger(__name__)

STATE_KIND = "batch_inference"
OUTPUT_UPLOAD_TIMEOUT_S = 300.0

# Computes one shard's output from its number; its bytes are stored as the shard's object.
ProcessShard = Callable[[int], bytes]


def inference_state(shard_count: int, finished: set[int]) -> dict[str, Any]:
    """Return the checkpoint state: plain types only, so weights_only loads read it."""
    return {"kind": STATE_KIND, "shard_count": shard_count, "finished": sorted(finished)}


def finished_from_state(state: dict[str, Any], shard_count: int) -> set[int]:
    """Return the finished shards of a checkpoint; raises ValueError if it is not one of ours."""
    if state.get("kind") != STATE_KIND:
        raise ValueError(f"checkpoint is not a batch inference state (kind {state.get('kind')!r})")
    if int(state["shard_count"]) != shard_count:
        raise ValueError(
            f"checkpoint covers {state['shard_count']} shards, this job has {shard_count}: "
            "keep the inputs unchanged between attempts"
        )
    return {int(shard) for shard in state["finished"]}


def stored_output_shards(keys: list[str]) -> set[int]:
    """Return the shard numbers of the output objects among keys."""
    prefix, suffix = f"{protocol.OUTPUTS_DIR}/shard-", ".json"
    shards = set()
    for key in keys:
        number = key[len(prefix) : -len(suffix)]
        if key.startswith(prefix) and key.endswith(suffix) and number.isdigit():
            shards.add(int(number))
    return shards


def run_batch_inference(session: Any, shard_count: int, process_shard: ProcessShard) -> int:
    """Process every shard not yet finished, under session (a WorkerSession); return the exit code.

    A stop request is honoured between shards: the shard in progress is finished first.
    """
    marker = session.completion_marker()
    if marker is not None:
        return session.already_completed(marker)
    try:
        finished, resumed_from = _restore_finished(session, shard_count)
    except (BadCheckpoint, KeyError, ValueError, TypeError) as exc:
        return session.fail(f"cannot restore the inference progress: {exc}", protocol.EXIT_BAD_CHECKPOINT)

    session.started(len(finished), resumed_from, total_steps=shard_count)
    for shard in range(shard_count):
        if shard in finished:
            continue
        if session.preemption.stop_requested:
            return session.stop(len(finished), inference_state(shard_count, finished))
        _run_shard(session, shard, process_shard)
        finished.add(shard)
        session.step(len(finished), {"shards_finished": float(len(finished))})
        session.checkpoint(len(finished), inference_state(shard_count, finished))
        if session.config.step_delay_s:
            session.preemption.wait(session.config.step_delay_s)

    metrics = {"shards": float(shard_count)}
    return session.complete(len(finished), None, metrics)


def _restore_finished(session: Any, shard_count: int) -> tuple[set[int], Any]:
    restored = session.restore()
    finished: set[int] = set()
    if restored is not None:
        finished = finished_from_state(restored[1], shard_count)
    keys = session.loop.run(session.storage.list(f"{protocol.OUTPUTS_DIR}/"), timeout_s=120)
    unrecorded = {shard for shard in stored_output_shards(keys) if shard < shard_count} - finished
    if unrecorded:
        logger.info(
            "shards %s have stored outputs but were not in the checkpoint; not redoing them",
            sorted(unrecorded),
        )
    logger.info("%d of %d shards already finished", len(finished | unrecorded), shard_count)
    return finished | unrecorded, restored[0] if restored else None


def _run_shard(session: Any, shard: int, process_shard: ProcessShard) -> None:
    output = process_shard(shard)
    key = protocol.shard_output_key(shard)
    session.loop.run(session.storage.put_bytes(key, output), timeout_s=OUTPUT_UPLOAD_TIMEOUT_S)
    logger.info("shard %d finished: %s (%d bytes)", shard, key, len(output))
