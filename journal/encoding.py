"""Canonical JSON, the hash chain, and decoding of stored rows.

A row's hash is the hex SHA-256 of these UTF-8 bytes:

    header + "\\n" + data

where `header` is the compact JSON array
`[previous_hash, seq, stream, version, type, schema_version, recorded_at]` written by
`json.dumps(..., separators=(",", ":"), ensure_ascii=True)`, and `data` is the stored data text,
which is itself canonical JSON (sorted keys, compact separators, ASCII only). The header contains
no raw newline, so the first newline ends it. The first row chains from 64 zeros.
"""

from __future__ import annotations

import hashlib
import json
from json.encoder import encode_basestring_ascii
from collections.abc import Callable, Mapping
from typing import Any

from journal.errors import CorruptJournal
from journal.records import RecordedEvent

GENESIS_HASH = "0" * 64

Upcasters = Mapping[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]]

# Column order of every SELECT that decode_row() reads.
EVENT_COLUMNS = "seq, stream, version, type, schema_version, data, recorded_at, hash"

_dump_data = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
).encode


def canonical_json(data: dict[str, Any]) -> str:
    """Encode event data the one way the journal stores it; raises TypeError or ValueError."""
    return _dump_data(data)


def chain_hash(
    previous_hash: str,
    seq: int,
    stream: str,
    version: int,
    event_type: str,
    schema_version: int,
    data_json: str,
    recorded_at: float,
) -> str:
    """Return the hex SHA-256 of one row, chained to the previous row's hash.

    The f-string writes the same header as json.dumps of the array in the module docstring
    (a test checks this), in about half the time. Raises ValueError or TypeError when a field
    read back from a damaged row has the wrong type.
    """
    header = (
        f'["{previous_hash}",{seq:d},{encode_basestring_ascii(stream)},{version:d},'
        f"{encode_basestring_ascii(event_type)},{schema_version:d},{float(recorded_at)!r}]"
    )
    return hashlib.sha256(f"{header}\n{data_json}".encode()).hexdigest()


def json_string(text: str) -> str:
    """Encode `text` as the JSON string literal that the row header holds."""
    return encode_basestring_ascii(text)


def json_time(recorded_at: float) -> str:
    """Encode a timestamp as the row header stores it: the shortest repr of the double."""
    return repr(float(recorded_at))


def hash_encoded_row(
    previous_hash: str,
    seq: int,
    stream_json: str,
    version: int,
    type_json: str,
    schema_version: int,
    time_json: str,
    data_json: str,
) -> str:
    """Return chain_hash() of a row whose strings were encoded with json_string and json_time.

    The writer encodes the stream once per append and the time once per batch. `seq`,
    `version` and `schema_version` must be of type int (the writer checks them), so that
    plain formatting writes them as JSON integers.
    """
    header = f'["{previous_hash}",{seq},{stream_json},{version},{type_json},{schema_version},'
    return _sha256(f"{header}{time_json}]\n{data_json}".encode()).hexdigest()


_sha256 = hashlib.sha256


def upcast(
    upcasters: Upcasters, event_type: str, schema_version: int, data: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    """Apply upcasters (type, version) -> version + 1 until none matches."""
    while (step := upcasters.get((event_type, schema_version))) is not None:
        data = step(data)
        schema_version += 1
    return schema_version, data


def decode_row(row: tuple, upcasters: Upcasters) -> RecordedEvent:
    """Build a RecordedEvent from a row selected with EVENT_COLUMNS."""
    seq, stream, version, event_type, schema_version, data_json, recorded_at, row_hash = row
    data = decode_data(seq, data_json)
    if upcasters:
        schema_version, data = upcast(upcasters, event_type, schema_version, data)
    return RecordedEvent(
        seq, stream, version, event_type, schema_version, data, recorded_at, row_hash
    )


def decode_data(seq: int, data_json: str) -> dict[str, Any]:
    """Parse a stored row's data; raises CorruptJournal naming seq when it is not a JSON object."""
    try:
        data = json.loads(data_json)
    except (TypeError, ValueError) as exc:
        raise CorruptJournal(
            f"event seq {seq} has undecodable data ({exc}); run verify to find tampered rows",
            seq=seq,
        ) from exc
    if not isinstance(data, dict):
        raise CorruptJournal(
            f"event seq {seq} has data of type {type(data).__name__}, expected a JSON object",
            seq=seq,
        )
    return data
