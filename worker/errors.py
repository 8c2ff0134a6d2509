"""Errors of the worker package.

WorkerError
 +-- ConfigError            an environment variable is missing or invalid (EXIT_BAD_CONFIG)
 +-- StorageError           see worker.storage: ObjectNotFound, StorageUnavailable, ...
 +-- CheckpointError
      +-- BadCheckpoint     a verified checkpoint cannot be loaded (EXIT_BAD_CHECKPOINT)
      +-- CheckpointTimeout an upload did not become durable within the time allowed
"""

from __future__ import annotations


class WorkerError(Exception):
    """Root of every error the worker raises on purpose."""


class ConfigError(WorkerError):
    """The worker's configuration (environment variables) is missing or invalid."""


class CheckpointError(WorkerError):
    """A checkpoint could not be written, found or loaded."""


class BadCheckpoint(CheckpointError):
    """A checkpoint whose digest matches cannot be loaded; a restart would fail the same way."""


class CheckpointTimeout(CheckpointError):
    """Pending checkpoint uploads were not durable within the time allowed."""
