"""Multipart upload parts sent by a thread pool of synchronous botocore calls.

Each part is read, hashed (CRC32, or Content-MD5) and sent on one pool thread, the way boto3's
upload_file sends parts. Through the event loop, every part went through one thread and
aiohttp copied each body again (botocore wraps bytes in BytesIO, which aiohttp reads in
256 KiB chunks), so the same upload cost more CPU and was slower. The control calls (create,
complete, abort) stay on the async client.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import threading
import zlib
from collections.abc import Callable
from typing import Any

import boto3
from botocore.config import Config

# Reads `size` bytes at `offset` of the object; runs on a pool thread.
ReadPart = Callable[[int, int], bytearray]


class PartUploader:
    """Sends the parts of multipart uploads to one bucket, at most `threads` at a time."""

    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str | None,
        profile: str | None,
        region: str | None,
        config: Config,
        threads: int,
        crc32: bool,
    ) -> None:
        """crc32 sends each part's CRC32 (the upload must be created with that algorithm) in
        place of its Content-MD5."""
        self.bucket = bucket
        self.crc32 = crc32
        self._endpoint_url = endpoint_url
        self._profile = profile
        self._region = region
        self._config = config
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, "s3-part")
        self._client: Any = None
        self._client_lock = threading.Lock()

    def _get_client(self) -> Any:
        # botocore clients are thread-safe once created, but creating one is not.
        with self._client_lock:
            if self._client is None:
                session = boto3.session.Session(
                    profile_name=self._profile, region_name=self._region
                )
                self._client = session.client(
                    "s3", endpoint_url=self._endpoint_url, config=self._config
                )
            return self._client

    def submit(
        self, full_key: str, upload_id: str, number: int, offset: int, size: int,
        read_part: ReadPart,
    ) -> concurrent.futures.Future[dict[str, Any]]:
        """Start sending one part; the future returns its entry for CompleteMultipartUpload."""
        return self._pool.submit(
            self._upload_part, full_key, upload_id, number, offset, size, read_part
        )

    def _upload_part(
        self, full_key: str, upload_id: str, number: int, offset: int, size: int,
        read_part: ReadPart,
    ) -> dict[str, Any]:
        body = read_part(offset, size)
        # One checksum that the server verifies is enough; CRC32 costs less CPU than MD5.
        if self.crc32:
            checksums = {"ChecksumCRC32": _base64(zlib.crc32(body).to_bytes(4, "big"))}
        else:
            checksums = {"ContentMD5": _base64(hashlib.md5(body, usedforsecurity=False).digest())}
        response = self._get_client().upload_part(
            Bucket=self.bucket,
            Key=full_key,
            UploadId=upload_id,
            PartNumber=number,
            Body=body,  # a bytearray, which botocore sends as is
            **checksums,
        )
        part = {"PartNumber": number, "ETag": response["ETag"]}
        if self.crc32:
            part["ChecksumCRC32"] = checksums["ChecksumCRC32"]
        return part

    async def close(self) -> None:
        """Wait for parts still being sent, then close the connections."""
        await asyncio.to_thread(self._pool.shutdown, wait=True)
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


def _base64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")
