"""Load YAML with line numbers and strict checks, for config files users edit by hand.

PyYAML follows YAML 1.1, where `no` reads as false and `1e-4` as a string. This loader reads
`1e-4` as a float, as YAML 1.2 does. It keeps the 1.1 booleans, but an error names them where a
string was expected. It rejects the 1.1 numbers that users rarely mean: base 60 (`1:30` is 90),
a leading zero (`010` is octal 8), and `.nan` or `.inf`, which would pass every range check.
Each key keeps its line, so that an error can point at it, and a duplicate key is rejected
instead of the last one winning.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gpujobs.errors import ConfigError


@dataclass(frozen=True)
class Located:
    """A mapping read from YAML, with the line of each key (1-based)."""

    values: dict[str, Any]
    lines: dict[str, int]
    line: int
    path: str

    def line_of(self, key: str) -> int:
        return self.lines.get(key, self.line)


class _StrictLoader(yaml.SafeLoader):
    pass


# YAML 1.2 floats that YAML 1.1 leaves as strings: an exponent without a dot or without a
# sign (1e-4, 2E3, 1.5e3).
_EXPONENT_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+$")
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789")
)


# YAML 1.1 integers that YAML 1.2 and most readers take differently.
_SEXAGESIMAL = re.compile(r"^[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?$")
_OCTAL = re.compile(r"^[-+]?0[0-7_]+$")


class _SurprisingScalar(Exception):
    """A number that YAML 1.1 reads in a way the user rarely means; the mapping adds the key."""

    def __init__(self, problem: str, line: int) -> None:
        super().__init__(problem)
        self.problem = problem
        self.line = line


def _construct_int(loader: _StrictLoader, node: yaml.ScalarNode) -> int:
    value = loader.construct_yaml_int(node)
    text = str(node.value)
    line = node.start_mark.line + 1
    if _SEXAGESIMAL.match(text):
        raise _SurprisingScalar(
            f"YAML 1.1 reads {text} as the base-60 number {value}; write {value}, "
            f"or quote '{text}' for a string", line)
    if _OCTAL.match(text):
        decimal = text.replace("_", "").lstrip("+-").lstrip("0") or "0"
        raise _SurprisingScalar(
            f"YAML 1.1 reads {text} as the octal number {value}; write {decimal} without "
            f"the leading zero, or quote '{text}' for a string", line)
    return value


def _construct_float(loader: _StrictLoader, node: yaml.ScalarNode) -> float:
    value = loader.construct_yaml_float(node)
    text = str(node.value)
    line = node.start_mark.line + 1
    if not math.isfinite(value):
        raise _SurprisingScalar(f"expected a finite number, got {text}", line)
    if _SEXAGESIMAL.match(text):
        raise _SurprisingScalar(
            f"YAML 1.1 reads {text} as the base-60 number {value:g}; write {value:g}, "
            f"or quote '{text}' for a string", line)
    return value


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)  # type: ignore[arg-type]
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)  # type: ignore[arg-type]


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> Located:
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise ConfigError(
                f"key {key!r} must be a string", path=loader.name, line=line, key=str(key)
            )
        if key in values:
            raise ConfigError(
                f"duplicate key {key!r} (first at line {lines[key]}); keep only one",
                path=loader.name, line=line, key=key,
            )
        try:
            values[key] = loader.construct_object(value_node, deep=True)
        except _SurprisingScalar as exc:
            raise ConfigError(f"{key}: {exc.problem}", path=loader.name, line=exc.line,
                              key=key) from None
        lines[key] = line
    return Located(values, lines, node.start_mark.line + 1, loader.name)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping  # type: ignore[arg-type]
)


def load_yaml(path: Path) -> Any:
    """Parse a YAML file into Located mappings; raises ConfigError for a missing or broken file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError("file not found; create it or pass the right path", path=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                          f"{exc.start}); save the file as UTF-8", path=str(path)) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror}", path=str(path)) from exc
    return load_yaml_text(text, str(path))


def load_yaml_text(text: str, name: str) -> Any:
    loader = _StrictLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    except _SurprisingScalar as exc:
        raise ConfigError(exc.problem, path=name, line=exc.line) from None
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise ConfigError(f"invalid YAML: {exc.problem}", path=name, line=line) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", path=name) from exc
    finally:
        loader.dispose()


def plain(value: Any) -> Any:
    """Strip line information, giving ordinary dicts and lists."""
    if isinstance(value, Located):
        return {k: plain(v) for k, v in value.values.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


class FieldReader:
    """Typed access to one mapping's keys, with errors that name file, line, key and form."""

    def __init__(self, mapping: Located, context: str) -> None:
        self.mapping = mapping
        self.context = context
        self.used: set[str] = set()

    def fail(self, key: str, message: str) -> ConfigError:
        """Build the error for `key`, pointing at its line."""
        return ConfigError(
            f"{self.context}: {key}: {message}",
            path=self.mapping.path, line=self.mapping.line_of(key), key=key,
        )

    def _get(self, key: str, required: bool) -> Any:
        self.used.add(key)
        if key not in self.mapping.values:
            if required:
                raise ConfigError(
                    f"{self.context}: missing required key {key!r}",
                    path=self.mapping.path, line=self.mapping.line, key=key,
                )
            return None
        return self.mapping.values[key]

    def string(self, key: str, *, required: bool = True, default: str | None = None) -> str | None:
        value = self._get(key, required)
        if value is None:
            return default
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"expected a non-empty string, got {_show(value)}")
        return value

    def integer(self, key: str, *, required: bool = True, default: int | None = None,
                minimum: int | None = None, maximum: int | None = None) -> int | None:
        value = self._get(key, required)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            raise self.fail(key, f"expected a whole number, got float {value!r}; "
                            f"write {int(value)}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected a whole number, got {_show(value)}")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.fail(key, f"must be at most {maximum}, got {value}")
        return value

    def number(self, key: str, *, required: bool = True, default: float | None = None,
               minimum: float | None = None, maximum: float | None = None,
               exclusive_minimum: bool = False) -> float | None:
        value = self._get(key, required)
        if value is None:
            return default
        if isinstance(value, str):
            value = self._number_from_string(key, value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"expected a number, got {_show(value)}")
        number = float(value)
        if minimum is not None and (number <= minimum if exclusive_minimum else number < minimum):
            bound = "greater than" if exclusive_minimum else "at least"
            raise self.fail(key, f"must be {bound} {minimum:g}, got {number:g}")
        if maximum is not None and number > maximum:
            raise self.fail(key, f"must be at most {maximum:g}, got {number:g}")
        return number

    def _number_from_string(self, key: str, text: str) -> float:
        # Unquoted numbers (1e-4 included) never reach here, so this string was quoted.
        hint = "; remove the quotes" if _looks_numeric(text) else ""
        raise self.fail(key, f"expected a number, got the string {text!r}{hint}")

    def boolean(self, key: str, *, required: bool = True, default: bool | None = None) -> bool | None:
        value = self._get(key, required)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {_show(value)}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], *, default: str) -> str:
        value = self._get(key, False)
        if value is None:
            return default
        if value not in choices:
            raise self.fail(key, f"expected one of {', '.join(choices)}, got {_show(value)}")
        return str(value)

    def raw(self, key: str) -> Any:
        return self._get(key, False)

    def reject_unknown(self, allowed: set[str] | None = None) -> None:
        known = self.used if allowed is None else allowed
        for key in self.mapping.values:
            if key not in known:
                expected = ", ".join(sorted(known))
                raise self.fail(key, f"unknown key; expected one of: {expected}")


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _show(value: Any) -> str:
    if isinstance(value, Located):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        # YAML 1.1 turns yes/no/on/off into booleans, which the user may not have meant, so name it.
        return f"the boolean {str(value).lower()} (YAML reads yes/no/on/off as booleans; quote it)"
    return f"{type(value).__name__} {value!r}"
