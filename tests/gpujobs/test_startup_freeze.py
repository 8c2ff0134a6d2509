"""The supervise command's freeze of startup objects: live ones frozen, garbage collected first."""

from __future__ import annotations

import gc
import weakref

from gpujobs.supervisor.core import freeze_startup_objects


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_freeze_keeps_live_objects_only() -> None:
    live = Node()
    garbage = Node()
    garbage.other = Node()
    garbage.other.other = garbage  # a reference cycle that only the collector frees
    garbage_ref = weakref.ref(garbage)
    del garbage
    try:
        frozen = freeze_startup_objects()
        tracked = {id(item) for item in gc.get_objects()}

        assert garbage_ref() is None
        assert frozen == gc.get_freeze_count()
        assert frozen > 0
        assert id(live) not in tracked
    finally:
        gc.unfreeze()
    assert id(live) in {id(item) for item in gc.get_objects()}
