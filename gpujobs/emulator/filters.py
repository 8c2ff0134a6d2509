"""Evaluation of Vast.ai filter objects (``{"field": {"op": value}}``) and orderings on rows.

The API accepts numbers sent as strings (the CLI sends ``"num_gpus": {"eq": "1"}``), so each
filter value is coerced to the type of the row's value before comparing.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from gpujobs.emulator.errors import QueryError

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda left, right: left == right,
    "neq": lambda left, right: left != right,
    "gt": lambda left, right: left > right,
    "gte": lambda left, right: left >= right,
    "lt": lambda left, right: left < right,
    "lte": lambda left, right: left <= right,
}
OPERATORS = frozenset(_COMPARE) | {"in", "notin"}


def coerce_like(sample: Any, value: Any) -> Any:
    """Convert a filter value to the type of ``sample`` (the row's value) where it can."""
    if value is None or sample is None:
        return value
    if isinstance(sample, bool):
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("true", "1"):
                return True
            if lowered in ("false", "0"):
                return False
        return value if isinstance(value, bool) else bool(value)
    if isinstance(sample, (int, float)):
        try:
            return float(value)
        except (TypeError, ValueError):
            return value
    if isinstance(sample, str) and not isinstance(value, str):
        return str(value)
    return value


def check_filters(filters: Mapping[str, Any]) -> None:
    """Raise QueryError when a filter uses an unknown operator."""
    for field, condition in filters.items():
        if not isinstance(condition, Mapping):
            continue
        for operator in condition:
            if operator not in OPERATORS:
                raise QueryError(f"unknown operator {operator!r} on field {field!r}; use one of "
                                 f"{', '.join(sorted(OPERATORS))}")


def compile_filters(filters: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], bool]:
    """Return a test of rows against `filters`; a bare value in them means ``eq``.

    `coerce_like` depends only on the type of the row's value, so each condition coerces its
    value once per type seen instead of once per row.
    """
    checks: list[_Check] = []
    for field, condition in filters.items():
        if not isinstance(condition, dict):
            condition = {"eq": condition}
        checks.extend(_Check(field, operator, expected) for operator, expected in condition.items())

    def test(row: Mapping[str, Any]) -> bool:
        for check in checks:
            if not check.passes(row.get(check.field)):
                return False
        return True

    return test


class _Check:
    """One operator of one field's condition, with its value coerced once per row value type."""

    __slots__ = ("field", "operator", "expected", "_coerced")

    def __init__(self, field: str, operator: str, expected: Any) -> None:
        self.field, self.operator, self.expected = field, operator, expected
        self._coerced: dict[type, Any] = {}

    def passes(self, actual: Any) -> bool:
        kind = type(actual)
        if kind not in self._coerced:
            self._coerced[kind] = self._coerce(actual)
        return _passes_coerced(actual, self.operator, self._coerced[kind])

    def _coerce(self, actual: Any) -> Any:
        if self.operator in ("in", "notin"):
            items = self.expected if isinstance(self.expected, (list, tuple)) else [self.expected]
            return [coerce_like(actual, item) for item in items]
        return coerce_like(actual, self.expected)


def _passes_coerced(actual: Any, operator: str, expected: Any) -> bool:
    if operator in ("in", "notin"):
        found = any(actual == item for item in expected)
        return found if operator == "in" else not found
    if operator in ("eq", "neq"):
        return _COMPARE[operator](actual, expected)
    if actual is None or expected is None:
        return False
    try:
        return _COMPARE[operator](actual, expected)
    except TypeError:
        return False


def sort_rows(rows: Iterable[dict], order: Iterable[tuple[str, str]]) -> list[dict]:
    """Sort by each (field, "asc"|"desc") in turn; null values sort last either way."""
    result = list(rows)
    for field, direction in reversed(list(order)):
        descending = str(direction).lower() == "desc"
        present = [row for row in result if row.get(field) is not None]
        missing = [row for row in result if row.get(field) is None]
        try:
            present.sort(key=lambda row: row[field], reverse=descending)
        except TypeError:
            present.sort(key=lambda row: str(row[field]), reverse=descending)
        result = present + missing
    return result


def parse_order(value: Any) -> list[tuple[str, str]]:
    """Accept ``[["score","desc"]]``, ``[{"col":"id","dir":"asc"}]`` or ``"score-"``."""
    if value is None:
        return []
    if isinstance(value, str):
        return [(part.strip("-+"), "desc" if part.strip().endswith("-") else "asc")
                for part in value.split(",") if part.strip()]
    order: list[tuple[str, str]] = []
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, Mapping) and "col" in item:
            order.append((str(item["col"]), str(item.get("dir", "asc"))))
        elif isinstance(item, (list, tuple)) and item:
            order.append((str(item[0]), str(item[1]) if len(item) > 1 else "asc"))
        else:
            raise QueryError(f"invalid order entry {item!r}; use [field, \"asc\"|\"desc\"]")
    return order
