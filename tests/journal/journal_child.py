"""Child process for the journal's crash and concurrency tests.

    journal_child.py torture PATH
        Append forever from 8 tasks and print "ack SEQ STREAM VERSION" per event.
    journal_child.py contend PATH NAME N
        After "go" on stdin, append N events to stream "shared", retrying conflicts.
        Then append N events to stream "own-NAME".

Every "ack" line is printed only after append() returned, so it names a durable event.
"""

from __future__ import annotations

import asyncio
import random
import sys

from journal import EventStore, NewEvent, VersionConflict
from journal_testkit import StreamCounter


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def torture_task(store: EventStore, rng: random.Random) -> None:
    while True:
        stream = f"stream-{rng.randrange(30)}"
        version = await store.stream_version(stream)
        events = [NewEvent("Ticked", {"n": rng.randrange(1000)}) for _ in range(rng.randint(1, 3))]
        try:
            recorded = await store.append(stream, events, expected_version=version)
        except VersionConflict:
            continue
        for event in recorded:
            emit(f"ack {event.seq} {event.stream} {event.version}")


async def torture(path: str) -> None:
    store = await EventStore.open(path, projections=[StreamCounter()])
    emit("ready")
    rng = random.Random()
    await asyncio.gather(*(torture_task(store, rng) for _ in range(8)))


async def append_with_retry(store: EventStore, stream: str, data: dict) -> int:
    conflicts = 0
    while True:
        version = await store.stream_version(stream)
        await asyncio.sleep(0.001)  # widen the read-to-append window so the writers collide
        try:
            recorded = await store.append(
                stream, [NewEvent("Counted", data)], expected_version=version
            )
        except VersionConflict as exc:
            conflicts += 1
            emit(f"conflict {exc.stream} {exc.expected} {exc.actual}")
            continue
        emit(f"ack {recorded[0].seq} {stream} {recorded[0].version}")
        return conflicts


async def contend(path: str, name: str, count: int) -> None:
    store = await EventStore.open(path, busy_timeout_s=60.0)
    emit("ready")
    await asyncio.to_thread(sys.stdin.readline)
    conflicts = 0
    for i in range(count):
        conflicts += await append_with_retry(store, "shared", {"writer": name, "i": i})
        conflicts += await append_with_retry(store, f"own-{name}", {"writer": name, "i": i})
    await store.close()
    emit(f"done {conflicts}")


def main() -> None:
    mode, path, *rest = sys.argv[1:]
    if mode == "torture":
        asyncio.run(torture(path))
    elif mode == "contend":
        asyncio.run(contend(path, rest[0], int(rest[1])))
    else:
        raise SystemExit(f"unknown mode {mode!r}; use torture or contend")


if __name__ == "__main__":
    main()
