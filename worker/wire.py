"""Strict parsing of the JSON documents that cross the wire: reports, manifests, markers.

Every document may come from a corrupt file or a hostile sender, so each reader here bounds
the size and nesting before it trusts anything, rejects NaN and Infinity where the format
does not allow them, and checks each field's type and range. Failures raise InvalidDocument,
a ValueError, with a one-line message.
"""

from __future__ import annotations

import json
import math
from typing import Any

# Largest integer that a 64-bit float, and so a JavaScript number, represents exactly.
MAX_WIRE_INT = 2**53
MAX_NAME_CHARS = 256  # job ids, metric names, file names
MAX_TEXT_CHARS = 8192  # free text such as a worker's error message
MAX_METRICS = 256
_MAX_SHOWN_CHARS = 60


class InvalidDocument(ValueError):
    """A JSON document that is malformed, too large, or has a field of the wrong type or range."""


def load_object(
    text: str | bytes, max_bytes: int, *, allow_constants: bool = False
) -> dict[str, Any]:
    """Parse text as one JSON object of at most max_bytes, or raise InvalidDocument.

    NaN, Infinity and -Infinity are rejected unless allow_constants is set, and then the
    field readers decide where a non-finite number may stand.
    """
    if len(text) > max_bytes:
        raise InvalidDocument(f"document has {len(text)} bytes, more than the limit of {max_bytes}")
    parse_constant = float if allow_constants else _reject_constant
    try:
        data = json.loads(text, parse_constant=parse_constant)
    except RecursionError:
        raise InvalidDocument("document is nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise InvalidDocument(f"document is not valid UTF-8: {exc.reason}") from None
    except json.JSONDecodeError as exc:
        message = f"document is not valid JSON: {exc.msg} at offset {exc.pos}"
        raise InvalidDocument(message) from None
    except ValueError as exc:  # raised for NaN and Infinity, or an integer of too many digits
        raise InvalidDocument(str(exc).splitlines()[0]) from None
    if not isinstance(data, dict):
        raise InvalidDocument(f"document must be a JSON object, not {_type_name(data)}")
    return data


def require_object(data: Any, name: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise InvalidDocument(f"{name} must be a JSON object, not {_type_name(data)}")
    return data


def get_int(
    data: dict[str, Any],
    name: str,
    default: int | None = None,
    *,
    minimum: int = 0,
    maximum: int = MAX_WIRE_INT,
) -> int:
    """Return field name as an int in minimum..maximum, or default when the field is missing."""
    value = _get(data, name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidDocument(f"{name} must be an integer, not {_show(value)}")
    if not minimum <= value <= maximum:
        raise InvalidDocument(f"{name}={_show(value)} is outside {minimum}..{maximum}")
    return value


def get_optional_int(
    data: dict[str, Any], name: str, *, minimum: int = 0, maximum: int = MAX_WIRE_INT
) -> int | None:
    if data.get(name) is None:
        return None
    return get_int(data, name, minimum=minimum, maximum=maximum)


def get_float(data: dict[str, Any], name: str) -> float:
    """Return field name as a finite float. JSON integers are accepted too."""
    return finite_float(_get(data, name, None), name)


def finite_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidDocument(f"{name} must be a number, not {_show(value)}")
    result = float(value)
    if not math.isfinite(result):
        raise InvalidDocument(f"{name}={_show(value)} is not a finite number")
    return result


def get_str(
    data: dict[str, Any],
    name: str,
    default: str | None = None,
    *,
    min_chars: int = 1,
    max_chars: int = MAX_NAME_CHARS,
) -> str:
    """Return field name as a string of min_chars..max_chars characters."""
    value = _get(data, name, default)
    if not isinstance(value, str):
        raise InvalidDocument(f"{name} must be a string, not {_show(value)}")
    if not min_chars <= len(value) <= max_chars:
        raise InvalidDocument(
            f"{name} must have {min_chars} to {max_chars} characters, not {len(value)}"
        )
    return value


def get_metrics(
    data: dict[str, Any], name: str = "metrics", *, drop_non_finite: bool = False
) -> dict[str, float]:
    """Return field name as {metric: finite float}, leaving out nulls (non-finite when sent).

    A non-finite number raises InvalidDocument, or is left out too if drop_non_finite is set.
    """
    raw = data.get(name)
    if raw is None:
        return {}
    metrics = require_object(raw, name)
    if len(metrics) > MAX_METRICS:
        raise InvalidDocument(f"{name} has {len(metrics)} entries, more than {MAX_METRICS}")
    parsed: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or len(key) > MAX_NAME_CHARS:
            limit = MAX_NAME_CHARS
            raise InvalidDocument(f"{name} names must be strings of at most {limit} characters")
        if value is None:
            continue
        if drop_non_finite and isinstance(value, float) and not math.isfinite(value):
            continue
        parsed[key] = finite_float(value, f"{name}[{_show(key)}]")
    return parsed


def encode_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Return metrics ready for strict JSON: a non-finite float becomes None (null)."""
    return {
        name: None if isinstance(value, float) and not math.isfinite(value) else value
        for name, value in metrics.items()
    }


def _get(data: dict[str, Any], name: str, default: Any) -> Any:
    if name in data:
        return data[name]
    if default is None:
        raise InvalidDocument(f"missing field {name!r}")
    return default


def _reject_constant(constant: str) -> Any:
    raise ValueError(f"document contains {constant}, which is not valid JSON")


def _type_name(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _show(value: Any) -> str:
    """Return repr(value) cut to a short single line, so hostile input cannot flood a log."""
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN_CHARS else text[: _MAX_SHOWN_CHARS - 3] + "..."
