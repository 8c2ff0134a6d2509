"""The offer query language of the official ``vastai`` CLI (version 1.9.1).

``parse_query("gpu_name=RTX_4090 num_gpus=1 reliability>0.98")`` returns the JSON filter object
that the CLI sends to ``POST /bundles/``. The CLI's quirks are kept on purpose, because saved
queries must mean the same thing here and there: numbers stay strings except for the fields
with a unit multiplier, and ``_`` becomes a space in every string value. A value of
``any``, ``*`` or ``?`` with ``=`` deletes a filter, defaults included.
"""

from __future__ import annotations

import logging
import re
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_FILTERS: dict[str, dict[str, Any]] = {
    "verified": {"eq": True},
    "external": {"eq": False},
    "rentable": {"eq": True},
    "rented": {"eq": False},
}

FIELD_ALIASES = {
    "cuda_vers": "cuda_max_good",
    "display_active": "gpu_display_active",
    "dlperf_usd": "dlperf_per_dphtotal",
    "dph": "dph_total",
    "flops_usd": "flops_per_dphtotal",
}

# Fields whose CLI value is in a larger unit: GB to MB, days to seconds.
FIELD_MULTIPLIERS = {
    "cpu_ram": 1000.0,
    "gpu_ram": 1000.0,
    "gpu_total_ram": 1000.0,
    "duration": 86400.0,
}

KNOWN_FIELDS = frozenset({
    "bw_nvlink", "compute_cap", "cpu_arch", "cpu_cores", "cpu_cores_effective", "cpu_ghz",
    "cpu_ram", "cuda_max_good", "datacenter", "direct_port_count", "driver_version", "disk_bw",
    "disk_space", "dlperf", "dlperf_per_dphtotal", "dph_total", "duration", "external",
    "flops_per_dphtotal", "gpu_arch", "gpu_display_active", "gpu_frac", "gpu_mem_bw", "gpu_name",
    "gpu_ram", "gpu_total_ram", "gpu_max_power", "gpu_max_temp", "has_avx", "host_id", "id",
    "inet_down", "inet_down_cost", "inet_up", "inet_up_cost", "machine_id", "min_bid",
    "mobo_name", "num_gpus", "pci_gen", "pcie_bw", "reliability", "rentable", "rented",
    "storage_cost", "static_ip", "total_flops", "ubuntu_version", "verification", "verified",
    "vms_enabled", "geolocation", "cluster_id",
})

OPERATORS = {
    "=": "eq", "==": "eq", "eq": "eq",
    "!=": "neq", "neq": "neq", "noteq": "neq", "not eq": "neq",
    ">": "gt", "gt": "gt", ">=": "gte", "gte": "gte",
    "<": "lt", "lt": "lt", "<=": "lte", "lte": "lte",
    "in": "in", "notin": "notin", "not in": "notin", "nin": "notin",
}

# One clause: a field, an operator (symbols, or a word between spaces), then a bracketed list,
# a double-quoted string or a bare word. The CLI tokenizes the same way.
_CLAUSE = re.compile(
    r'([A-Za-z0-9_]+)'
    r'( *[=><!]+| +(?:[lg]te?|nin|neq|eq|not ?eq|not ?in|in) )?'
    r'( *)'
    r'(\[[^\]]+\]|"[^"]+"|[^ ]+)?'
    r'( *)'
)
_WILDCARDS = ("any", "*", "?")


def parse_query(text: str | None, *, defaults: bool = True) -> dict[str, dict[str, Any]]:
    """Parse a CLI query string into the filter object sent to the offer search.

    With ``defaults`` the CLI's default filters (verified, not external, rentable, not rented)
    come first. Raises ValueError on text the grammar cannot consume or on an unknown operator.
    """
    result: dict[str, dict[str, Any]] = (
        {name: dict(ops) for name, ops in DEFAULT_FILTERS.items()} if defaults else {}
    )
    text = (text or "").strip()
    if not text:
        return result

    clauses = _CLAUSE.findall(text)
    consumed = "".join("".join(parts) for parts in clauses)
    if consumed != text:
        raise ValueError(
            f"invalid query {text!r}: could not parse past {consumed!r}; "
            "quote the whole query and write clauses as field<op>value"
        )
    for field, operator, _, value, _ in clauses:
        _apply_clause(result, field, operator.strip(), value)
    return result


def _apply_clause(result: dict, field: str, operator: str, raw_value: str) -> None:
    value: Any = raw_value.strip(",[]")
    op_name = OPERATORS.get(operator)

    if field in FIELD_ALIASES:
        alias = field
        field = FIELD_ALIASES[field]
        if alias in result:
            result[field] = result.pop(alias)
    if field == "driver_version" and "." in value:
        value = _numeric_driver_version(value)
    if field not in KNOWN_FIELDS:
        logger.warning("unrecognized offer field %r in query; the server may ignore it", field)
    if op_name is None:
        raise ValueError(f"unknown operator {operator!r} after field {field!r}; "
                         f"use one of {', '.join(sorted(OPERATORS))}")
    if op_name in ("in", "notin"):
        value = [item.strip() for item in value.split(",") if item.strip()]
    if value in ([], ""):
        raise ValueError(f"missing value for field {field!r}; write {field}{operator}VALUE")

    if value in _WILDCARDS:
        if op_name != "eq":
            raise ValueError(f"wildcard {value!r} on {field!r} needs '=', not {operator!r}")
        result.pop(field, None)
        return

    ops = result.setdefault(field, {})
    ops[op_name] = _convert_value(field, value)


def _convert_value(field: str, value: Any) -> Any:
    if isinstance(value, list):
        items = [item.replace("_", " ").strip('"') for item in value]
        if field in FIELD_MULTIPLIERS:
            return [float(item) * FIELD_MULTIPLIERS[field] for item in items]
        return items
    if isinstance(value, int):
        return value
    value = value.replace("_", " ").strip('"')
    if field in FIELD_MULTIPLIERS:
        try:
            return float(value) * FIELD_MULTIPLIERS[field]
        except ValueError:
            raise ValueError(f"value {value!r} for {field!r} must be a number") from None
    return {"true": True, "True": True, "false": False, "False": False,
            "null": None, "None": None}.get(value, value)


def _numeric_driver_version(version: str) -> int:
    """Turn ``535.86.05`` into ``535086005``, the form the server compares."""
    parts = version.split(".")
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        raise ValueError(f"driver_version {version!r} must look like 535.86.05")
    return int("".join(part.zfill(3) for part in parts))


def parse_order(text: str | list | None) -> list[list[str]]:
    """Parse ``"score-,dph_total"`` into ``[["score", "desc"], ["dph_total", "asc"]]``.

    A ``-`` before or after a field means descending and ``+`` ascending. Aliases such as
    ``dph`` are resolved. A list is returned as lists of two strings.
    """
    if text is None:
        return []
    if not isinstance(text, str):
        return [[str(name), str(direction)] for name, direction in text]
    order: list[list[str]] = []
    for name in (part.strip() for part in text.split(",")):
        if not name:
            continue
        direction = "asc"
        if name.strip("-") != name:
            direction, name = "desc", name.strip("-")
        if name.strip("+") != name:
            direction, name = "asc", name.strip("+")
        order.append([FIELD_ALIASES.get(name, name), direction])
    return order
