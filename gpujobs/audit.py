"""Queries behind `gpujobs audit`: filtered event listings and their export formats.

Everything here reads the journal file read-only, so an audit can run next to a live
supervisor without taking the write lock.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from journal import decode_data, run_readonly_query

from gpujobs.errors import GpujobsError, JobNotFound
from gpujobs.events import EVENT_TYPES
from gpujobs.states import NON_TRANSITION_EVENTS

# Columns of every row that query_events returns, in export order.
EVENT_FIELDS = (
    "seq", "job_id", "version", "type", "schema_version", "recorded_at", "recorded_utc",
    "team", "project", "attempt", "data", "hash",
)
KNOWN_EVENT_TYPES = frozenset(EVENT_TYPES) | NON_TRANSITION_EVENTS
MIN_TIME_S = 0.0  # 1970-01-01T00:00:00Z
MAX_TIME_S = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc).timestamp()
MAX_LIMIT = 2**63 - 1  # the largest integer SQLite stores


@dataclass(frozen=True)
class AuditFilters:
    """Filters of `gpujobs audit`; a filter left at None or empty matches every event."""

    job: str | None = None
    types: tuple[str, ...] = ()
    since: float | None = None  # unix seconds, inclusive
    until: float | None = None  # unix seconds, inclusive
    team: str | None = None
    project: str | None = None
    limit: int | None = None  # the newest N matching events, still listed oldest first


def parse_time(text: str) -> float:
    """Parse ISO 8601 (UTC when no zone is given) or unix seconds into unix seconds.

    A year alone (2030) or a year and month (2030-06) is ISO 8601's reduced precision: the
    start of that year or month, not unix second 2030. Raises GpujobsError for text that
    matches none of these forms, and for times outside the years 1970 to 9999.
    """
    reduced = _YEAR_MONTH.match(text.strip())
    if reduced:
        text = f"{reduced.group(1)}-{reduced.group(2) or '01'}-01"
    try:
        seconds = float(text)
    except ValueError:
        seconds = _parse_iso(text)
    if not MIN_TIME_S <= seconds <= MAX_TIME_S:  # also False for nan
        raise GpujobsError(
            f"invalid time {text!r}: it is not between 1970-01-01 and 9999-12-31 UTC; use "
            "ISO 8601 (2026-12-04T16:30:00) or unix seconds in that range"
        )
    return seconds


_YEAR_MONTH = re.compile(r"^([0-9]{4})(?:-(0[1-9]|1[0-2]))?$")


def _parse_iso(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return moment.timestamp()
    except (ValueError, OverflowError):
        raise GpujobsError(
            f"invalid time {text!r}; use ISO 8601 (2026-12-04 or 2026-12-04T16:30:00) "
            "or unix seconds"
        ) from None


def iso_utc(epoch: float) -> str:
    """Format unix seconds as ISO 8601 UTC with milliseconds."""
    moment = datetime.fromtimestamp(epoch, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def query_events(path: str | Path, filters: AuditFilters) -> list[dict[str, Any]]:
    """Return the events that match `filters`, in seq order, with team and project joined.

    Raises GpujobsError for an invalid filter and JobNotFound for a job with no events.
    """
    _check_filters(filters)
    has_jobs = _has_table(path, "jobs")
    if (filters.team or filters.project) and not has_jobs:
        raise GpujobsError(
            f"journal {path} has no jobs table, so --team and --project cannot be applied; "
            "run `gpujobs submit` or `gpujobs supervise` once to create the table"
        )
    if filters.types:
        _check_types(path, filters.types)

    sql, params = _select_sql(filters, has_jobs)
    _, rows = run_readonly_query(path, sql, params)
    if filters.job is not None and not rows and not _stream_exists(path, filters.job):
        raise JobNotFound(filters.job, str(path))
    return [_row_dict(row) for row in reversed(rows)]


def _check_filters(filters: AuditFilters) -> None:
    if filters.limit is not None and not 1 <= filters.limit <= MAX_LIMIT:
        raise GpujobsError(
            f"invalid --limit {filters.limit}; use a number of events from 1 to {MAX_LIMIT}"
        )
    if filters.since is not None and filters.until is not None and filters.since > filters.until:
        raise GpujobsError(
            f"--since ({iso_utc(filters.since)}) is after --until ({iso_utc(filters.until)}); "
            "swap them"
        )


def _check_types(path: str | Path, types: Iterable[str]) -> None:
    _, rows = run_readonly_query(path, "SELECT DISTINCT type FROM events")
    present = {row[0] for row in rows}
    for event_type in types:
        if event_type not in KNOWN_EVENT_TYPES and event_type not in present:
            choices = ", ".join(sorted(KNOWN_EVENT_TYPES | present))
            raise GpujobsError(f"unknown event type {event_type!r}; use one of: {choices}")


def _select_sql(filters: AuditFilters, has_jobs: bool) -> tuple[str, list[Any]]:
    """Build the SELECT, newest first so that LIMIT keeps the newest events."""
    columns = (
        "e.seq, e.stream, e.version, e.type, e.schema_version, e.recorded_at, "
        "e.data, e.hash"
    )
    if has_jobs:
        sql = f"SELECT {columns}, j.team, j.project FROM events AS e "
        sql += "LEFT JOIN jobs AS j ON j.job_id = e.stream"
    else:
        sql = f"SELECT {columns}, NULL, NULL FROM events AS e"
    where: list[str] = []
    params: list[Any] = []
    for clause, value in (
        ("e.stream = ?", filters.job),
        ("e.recorded_at >= ?", filters.since),
        ("e.recorded_at <= ?", filters.until),
        ("j.team = ?", filters.team),
        ("j.project = ?", filters.project),
    ):
        if value is not None:
            where.append(clause)
            params.append(value)
    if filters.types:
        where.append(f"e.type IN ({', '.join('?' for _ in filters.types)})")
        params.extend(filters.types)
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY e.seq DESC"
    if filters.limit is not None:
        sql += " LIMIT ?"
        params.append(filters.limit)
    return sql, params


def _row_dict(row: tuple) -> dict[str, Any]:
    seq, stream, version, event_type, schema_version, recorded_at, data_json, row_hash = row[:8]
    data = decode_data(seq, data_json)
    attempt = data.get("attempt")
    return {
        "seq": seq, "job_id": stream, "version": version, "type": event_type,
        "schema_version": schema_version, "recorded_at": recorded_at,
        "recorded_utc": iso_utc(recorded_at), "team": row[8], "project": row[9],
        "attempt": attempt, "data": data, "hash": row_hash,
    }


def _has_table(path: str | Path, name: str) -> bool:
    sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
    return bool(run_readonly_query(path, sql, (name,))[1])


def _stream_exists(path: str | Path, stream: str) -> bool:
    sql = "SELECT 1 FROM events WHERE stream = ? LIMIT 1"
    return bool(run_readonly_query(path, sql, (stream,))[1])


def write_csv(rows: Iterable[dict[str, Any]], out: TextIO) -> None:
    """Write rows as CSV with a header line; `data` is its canonical JSON text."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(EVENT_FIELDS)
    for row in rows:
        writer.writerow(_flat_values(row))


def write_jsonl(rows: Iterable[dict[str, Any]], out: TextIO) -> None:
    """Write one JSON object per line, `data` as a nested object."""
    for row in rows:
        out.write(json.dumps(row, sort_keys=False, separators=(",", ":")) + "\n")


def _flat_values(row: dict[str, Any]) -> list[Any]:
    values = []
    for field in EVENT_FIELDS:
        value = row[field]
        if field == "data":
            value = json.dumps(value, sort_keys=True, separators=(",", ":"))
        values.append("" if value is None else value)
    return values


def summarize_data(data: dict[str, Any], width: int = 60) -> str:
    """Return the event data as `key=value` pairs for a table cell, cut to `width` characters."""
    parts = []
    for key, value in data.items():
        if isinstance(value, (dict, list)):
            value = "{...}" if isinstance(value, dict) else "[...]"
        parts.append(f"{key}={value}")
    text = " ".join(parts)
    return text if len(text) <= width else text[: width - 3] + "..."
