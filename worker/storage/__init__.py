"""Artifact storage: one async interface over a local folder (file://) and S3 (s3://).

The orchestrator imports this package to read checkpoint manifests and the completion marker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from worker.storage.base import (
    InvalidKey,
    ObjectNotFound,
    Storage,
    StorageAuthError,
    StorageError,
    StorageUnavailable,
    object_uri,
    validate_key,
)
from worker.storage.local import LocalStorage

__all__ = [
    "InvalidKey",
    "LocalStorage",
    "ObjectNotFound",
    "Storage",
    "StorageAuthError",
    "StorageError",
    "StorageUnavailable",
    "object_uri",
    "open_storage",
    "preflight",
    "validate_key",
]

logger = logging.getLogger(__name__)

ENV_S3_ENDPOINT_URL = "GPUJOBS_S3_ENDPOINT_URL"
ENV_S3_PATH_STYLE = "GPUJOBS_S3_PATH_STYLE"
# "0" leaves out the CRC32 of multipart parts, for S3-compatible stores that reject it.
ENV_S3_PART_CHECKSUMS = "GPUJOBS_S3_PART_CHECKSUMS"
PREFLIGHT_TIMEOUT_S = 15.0


def open_storage(uri: str, **options: Any) -> Storage:
    """Open file:///abs/path or s3://bucket/prefix; options go to the S3 backend.

    S3 options: endpoint_url (default $GPUJOBS_S3_ENDPOINT_URL, then $AWS_ENDPOINT_URL),
    region, path_style (default $GPUJOBS_S3_PATH_STYLE=1), profile, part_size_bytes,
    parts_in_flight, multipart_threshold_bytes, part_checksums (default
    $GPUJOBS_S3_PART_CHECKSUMS=1), page_size, connect_timeout_s, read_timeout_s, max_attempts.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"invalid file URI {uri!r}: use file:///absolute/path")
        return LocalStorage(Path(unquote(parsed.path)))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"invalid S3 URI {uri!r}: use s3://bucket/prefix")
        from worker.storage.s3 import S3Storage  # aioboto3 is only imported when needed

        options.setdefault(
            "endpoint_url",
            os.environ.get(ENV_S3_ENDPOINT_URL) or os.environ.get("AWS_ENDPOINT_URL") or None,
        )
        options.setdefault("path_style", os.environ.get(ENV_S3_PATH_STYLE, "") in ("1", "true"))
        options.setdefault("part_checksums", _part_checksums_from_env())
        return S3Storage(parsed.netloc, parsed.path, **options)
    raise StorageError(f"unsupported storage URI {uri!r}: use file:///path or s3://bucket/prefix")


def _part_checksums_from_env() -> bool:
    value = os.environ.get(ENV_S3_PART_CHECKSUMS, "1").strip().lower()
    if value not in ("0", "1", "true", "false"):
        raise StorageError(
            f"invalid {ENV_S3_PART_CHECKSUMS}={value!r}: use 1 (send a CRC32 per part) or 0"
        )
    return value in ("1", "true")


async def preflight(storage: Storage, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> None:
    """Write, read back and delete a probe object; raises StorageUnavailable with the reason."""
    key = f"preflight/probe-{uuid.uuid4().hex}"
    payload = f"gpujobs preflight {time.time()}".encode()
    try:
        async with asyncio.timeout(timeout_s):
            await storage.put_bytes(key, payload)
            read_back = await storage.get_bytes(key)
            await storage.delete(key)
    except TimeoutError as exc:
        raise StorageUnavailable(
            f"storage {storage.uri} did not answer within {timeout_s:g} s: "
            "check the endpoint URL and the network"
        ) from exc
    except StorageUnavailable:
        raise
    except StorageError as exc:
        message = f"storage {storage.uri} failed the preflight check: {exc}"
        raise StorageUnavailable(message) from exc
    if read_back != payload:
        raise StorageUnavailable(f"storage {storage.uri} returned different bytes for {key}")
    logger.info("storage %s passed the preflight check", storage.uri)
