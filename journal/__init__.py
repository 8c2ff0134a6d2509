"""A generic, tamper-evident event store in one SQLite file.

It stores streams of versioned events with optimistic concurrency, a SHA-256 hash chain,
projections updated in the append transaction, and upcasting of old event versions on read.
"""

from journal.errors import (
    CorruptJournal,
    InvalidAppend,
    InvalidQuery,
    JournalError,
    JournalLocked,
    ProjectionFailed,
    ReadOnlyViolation,
    SchemaTooNew,
    StorageError,
    StoreClosed,
    VersionConflict,
)
from journal.encoding import decode_data
from journal.readonly import QueryLimits, connect_readonly, readonly_uri, run_readonly_query
from journal.records import NewEvent, Projection, RecordedEvent, VerifyResult, WriterStats
from journal.store import EventStore
from journal.verify import read_head, verify_file

__all__ = [
    "CorruptJournal",
    "EventStore",
    "InvalidAppend",
    "InvalidQuery",
    "JournalError",
    "JournalLocked",
    "NewEvent",
    "Projection",
    "QueryLimits",
    "ProjectionFailed",
    "ReadOnlyViolation",
    "RecordedEvent",
    "SchemaTooNew",
    "StorageError",
    "StoreClosed",
    "VerifyResult",
    "VersionConflict",
    "WriterStats",
    "connect_readonly",
    "decode_data",
    "readonly_uri",
    "run_readonly_query",
    "read_head",
    "verify_file",
]
