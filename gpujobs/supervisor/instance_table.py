"""The instances a supervisor keeps between ticks, each stored as a tuple of plain values.

At 10,000 instances, Instance objects kept from one sweep to the next are 10,000 objects that
every full garbage collection walks, field by field. CPython stops tracking a tuple whose items
are all untracked (str, int, float, bool, None) the first time a collection examines it, so the
same records kept as tuples cost the collector nothing. A read builds the Instance again;
a tick reads only the instances it decides on.

Only the fields the supervisor reads are kept: no ports, no env, and of the API row only the
fields for storage billing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

from gpujobs.vast.records import Instance

Key = tuple[str, int]

# The only raw fields the supervisor reads, for storage billing. The rest of each API row, and
# the instance's env and ports, are dropped, because thousands of full rows would dominate the
# supervisor's memory.
KEPT_RAW_FIELDS = ("storage_total_cost", "storage_cost", "disk_space")
_DROPPED = ("ports", "extra_env", "raw")
_FIELDS = tuple(f.name for f in dataclasses.fields(Instance) if f.name not in _DROPPED)
_EMPTY: Mapping[str, Any] = {}


def pack(instance: Instance) -> tuple:
    """Return the instance's kept fields, then its kept raw fields (None where absent)."""
    raw = instance.raw
    return (*[getattr(instance, name) for name in _FIELDS],
            *[raw.get(name) for name in KEPT_RAW_FIELDS])


def unpack(packed: tuple) -> Instance:
    """Build the Instance that pack() was given, without ports, env or other raw fields."""
    count = len(_FIELDS)
    raw = {name: value for name, value in zip(KEPT_RAW_FIELDS, packed[count:])
           if value is not None}
    fields = dict(zip(_FIELDS, packed[:count]))
    return Instance(**fields, ports=_EMPTY, extra_env=_EMPTY, raw=raw)


def slim(instance: Instance) -> Instance:
    """Return the instance with only the fields an InstanceTable keeps."""
    return unpack(pack(instance))


class InstanceTable(dict):
    """Instances by (job id, attempt) label key; stores each packed, returns it unpacked.

    Membership tests and iteration over keys cost what a plain dict's do. Methods that would
    copy the packed tuples out as they are raise TypeError.
    """

    def __setitem__(self, key: Key, instance: Instance) -> None:
        super().__setitem__(key, pack(instance))

    def __getitem__(self, key: Key) -> Instance:
        return unpack(super().__getitem__(key))

    def get(self, key: Key, default: Instance | None = None) -> Instance | None:
        packed = super().get(key)
        return default if packed is None else unpack(packed)

    def pop(self, key: Key, *default: Instance | None) -> Instance | None:
        packed = super().pop(key, None)
        if packed is not None:
            return unpack(packed)
        if default:
            return default[0]
        raise KeyError(key)

    def items(self) -> Iterator[tuple[Key, Instance]]:
        for key, packed in super().items():
            yield key, unpack(packed)

    def values(self) -> Iterator[Instance]:
        for packed in super().values():
            yield unpack(packed)

    def update(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("InstanceTable.update is not supported; set each instance by its key")

    def setdefault(self, *args: Any) -> Any:
        raise TypeError("InstanceTable.setdefault is not supported; use get, then set the key")

    def copy(self) -> Any:
        raise TypeError("InstanceTable.copy is not supported; read the instances with items()")
