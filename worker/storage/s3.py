"""S3 backend over aioboto3, for AWS S3 and S3-compatible stores (MinIO, GCS, moto).

Large objects go up as multipart uploads with parallel parts; a multipart upload that fails
or is cancelled is aborted so that no orphaned parts keep costing storage.

Parts are sent by a thread pool of synchronous botocore calls (worker.storage.s3_parts); the
other requests go through aioboto3. Each body carries a checksum that the server checks (a
CRC32 per part, else Content-MD5, computed off the event loop), and the signature does not
hash the body (UNSIGNED-PAYLOAD). Over plain HTTP botocore would otherwise hash every body
with SHA-256, which slowed the parallel parts. The signed checksum header still binds the
body to the signature.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import functools
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aioboto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, ProfileNotFound

from worker.storage.base import (
    ObjectNotFound,
    StorageAuthError,
    StorageError,
    StorageUnavailable,
    validate_key,
)
from worker.storage.s3_parts import PartUploader, ReadPart

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_PART_SIZE_BYTES = 8 * MIB
# Parts uploaded at once, as many as boto3's upload_file threads. 16 were no faster against a
# local moto server, and each part in flight uses a part-sized buffer (80 MiB with 8 MiB parts).
DEFAULT_PARTS_IN_FLIGHT = 10
# Connections beyond the parts in flight, so small requests do not queue behind parts.
SPARE_CONNECTIONS = 2
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_AUTH_CODES = {
    "AccessDenied",
    "403",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "InvalidClientTokenId",
}

_MD5_ON_LOOP_BYTES = 64 * 1024  # smaller bodies are hashed inline: a thread hop costs more


async def _content_md5(data: bytes) -> str:
    """Return the base64 MD5 of `data` for Content-MD5, hashing large bodies off the loop."""
    if len(data) < _MD5_ON_LOOP_BYTES:
        return _md5_base64(data)
    return await asyncio.to_thread(_md5_base64, data)


def _md5_base64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode("ascii")


class S3Storage:
    """Storage under s3://bucket/prefix; the client is created on first use."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        path_style: bool = False,
        profile: str | None = None,
        part_size_bytes: int = DEFAULT_PART_SIZE_BYTES,
        parts_in_flight: int = DEFAULT_PARTS_IN_FLIGHT,
        multipart_threshold_bytes: int | None = None,
        part_checksums: bool = True,
        page_size: int = 1000,
        connect_timeout_s: float = 3.0,
        read_timeout_s: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.endpoint_url = endpoint_url
        self.part_size_bytes = part_size_bytes
        self.parts_in_flight = parts_in_flight
        self.multipart_threshold_bytes = multipart_threshold_bytes or part_size_bytes
        # CRC32 per part, as boto3's upload_file sends by default, in place of Content-MD5.
        # Without it, a moto 5.2 server took about 0.55 s instead of 0.35 s to complete a
        # 128 MiB upload. Turn it off for stores that reject x-amz-checksum headers.
        self.part_checksums = part_checksums
        self.page_size = page_size
        self._profile = profile
        self._region = region
        try:
            self._session = _shared_session(profile, region)
        except ProfileNotFound as exc:
            raise StorageAuthError(
                f"AWS profile {profile!r} not found for {self.uri}: add it to ~/.aws/credentials "
                "(or the file AWS_SHARED_CREDENTIALS_FILE names), or choose another profile"
            ) from exc
        self._config = Config(
            s3={"addressing_style": "path" if path_style else "auto",
                "payload_signing_enabled": False},
            # Content-MD5 covers each body, so no CRC32 is computed on the event loop as well.
            request_checksum_calculation="when_required",
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            max_pool_connections=parts_in_flight + SPARE_CONNECTIONS,
        )
        self._client_context: Any = None
        self._client: Any = None
        self._part_uploader: PartUploader | None = None

    async def _get_client(self) -> Any:
        if self._client is None:
            context = self._session.client(
                "s3", endpoint_url=self.endpoint_url, config=self._config
            )
            with self._translate_errors("connect to", ""):
                self._client = await context.__aenter__()
            self._client_context = context
        return self._client

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    async def put_bytes(self, key: str, data: bytes) -> None:
        if len(data) >= self.multipart_threshold_bytes:
            view = memoryview(data)

            def read_part(offset: int, size: int) -> bytearray:
                return bytearray(view[offset : offset + size])

            await self._multipart_upload(key, len(data), read_part)
            return
        client = await self._get_client()
        digest = await _content_md5(data)
        with self._translate_errors("put", key):
            await client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                    ContentMD5=digest)

    async def put_file(self, key: str, path: Path) -> None:
        size = path.stat().st_size
        if size < self.multipart_threshold_bytes:
            await self.put_bytes(key, await asyncio.to_thread(path.read_bytes))
            return
        await self._multipart_upload(key, size, functools.partial(_read_range, path))

    async def get_bytes(self, key: str) -> bytes:
        client = await self._get_client()
        with self._translate_errors("get", key):
            response = await client.get_object(Bucket=self.bucket, Key=self._key(key))
            async with response["Body"] as body:
                return await body.read()

    async def get_file(self, key: str, path: Path) -> None:
        client = await self._get_client()
        temp_path = path.with_name(f".partial-{path.name}")
        try:
            with self._translate_errors("get", key):
                response = await client.get_object(Bucket=self.bucket, Key=self._key(key))
                body = response["Body"]
                try:
                    with open(temp_path, "wb") as out:
                        async for chunk in body.iter_chunks(MIB):
                            out.write(chunk)
                finally:
                    body.close()
            os.replace(temp_path, path)
        finally:
            temp_path.unlink(missing_ok=True)

    async def exists(self, key: str) -> bool:
        client = await self._get_client()
        try:
            with self._translate_errors("head", key):
                await client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ObjectNotFound:
            return False
        return True

    async def list(self, prefix: str = "") -> list[str]:
        client = await self._get_client()
        if prefix.strip("/"):
            validate_key(prefix.strip("/"))
        strip = len(self.prefix) + 1 if self.prefix else 0
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        keys: list[str] = []
        request = {"Bucket": self.bucket, "Prefix": full_prefix, "MaxKeys": self.page_size}
        while True:
            with self._translate_errors("list", prefix):
                page = await client.list_objects_v2(**request)
            keys.extend(item["Key"][strip:] for item in page.get("Contents", []))
            if not page.get("IsTruncated"):
                return sorted(keys)
            request["ContinuationToken"] = page["NextContinuationToken"]

    async def delete(self, key: str) -> None:
        client = await self._get_client()
        try:
            with self._translate_errors("delete", key):
                await client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except ObjectNotFound:
            return

    async def close(self) -> None:
        if self._part_uploader is not None:
            uploader, self._part_uploader = self._part_uploader, None
            await uploader.close()
        if self._client_context is not None:
            context, self._client_context, self._client = self._client_context, None, None
            await context.__aexit__(None, None, None)

    async def _multipart_upload(self, key: str, size: int, read_part: ReadPart) -> None:
        client = await self._get_client()
        full_key = self._key(key)
        create = asyncio.ensure_future(client.create_multipart_upload(
            Bucket=self.bucket, Key=full_key, **self._checksum_algorithm()
        ))
        try:
            with self._translate_errors("start multipart upload of", key):
                upload = await asyncio.shield(create)
        except asyncio.CancelledError:
            # The server may have started the upload already: abort it once its id arrives.
            await asyncio.shield(self._abort_when_created(key, full_key, create))
            raise
        upload_id = upload["UploadId"]
        sent: list[concurrent.futures.Future[dict[str, Any]]] = []
        try:
            parts = await self._upload_parts(full_key, upload_id, size, read_part, sent)
            with self._translate_errors("complete multipart upload of", key):
                await client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=full_key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            # Shielded so that a cancelled task still aborts before it unwinds.
            await asyncio.shield(self._abort_multipart(key, full_key, upload_id, sent))
            raise

    async def _upload_parts(
        self,
        full_key: str,
        upload_id: str,
        size: int,
        read_part: ReadPart,
        sent: list[concurrent.futures.Future[dict[str, Any]]],
    ) -> list[dict[str, Any]]:
        """Send every part through the thread pool, appending each part's future to sent."""
        uploader = self._get_part_uploader()
        for number, offset in enumerate(range(0, size, self.part_size_bytes), 1):
            length = min(self.part_size_bytes, size - offset)
            sent.append(uploader.submit(full_key, upload_id, number, offset, length, read_part))
        parts = []
        for number, future in enumerate(sent, 1):
            with self._translate_errors(f"upload part {number} of", full_key):
                parts.append(await asyncio.wrap_future(future))
        return parts

    def _checksum_algorithm(self) -> dict[str, str]:
        return {"ChecksumAlgorithm": "CRC32"} if self.part_checksums else {}

    def _get_part_uploader(self) -> PartUploader:
        if self._part_uploader is None:
            self._part_uploader = PartUploader(
                bucket=self.bucket,
                endpoint_url=self.endpoint_url,
                profile=self._profile,
                region=self._region,
                config=self._config,
                threads=self.parts_in_flight,
                crc32=self.part_checksums,
            )
        return self._part_uploader

    async def _abort_when_created(self, key: str, full_key: str, create: asyncio.Future) -> None:
        """Abort the upload that a create request still under way starts, if it starts one."""
        try:
            upload = await create
        except Exception:  # the request failed, so it started nothing
            return
        await self._abort_multipart(key, full_key, upload["UploadId"], [])

    async def _abort_multipart(
        self,
        key: str,
        full_key: str,
        upload_id: str,
        sent: list[concurrent.futures.Future[dict[str, Any]]],
    ) -> None:
        for future in sent:
            future.cancel()  # parts that have not started
        # A part still being sent could complete after the abort and be stored again.
        await asyncio.to_thread(concurrent.futures.wait, sent)
        client = await self._get_client()
        try:
            await client.abort_multipart_upload(
                Bucket=self.bucket, Key=full_key, UploadId=upload_id
            )
            logger.warning("aborted multipart upload of %s/%s", self.uri, key)
        except (BotoCoreError, ClientError) as exc:
            logger.error(
                "could not abort multipart upload %s of %s/%s: %s", upload_id, self.uri, key, exc
            )

    @contextlib.contextmanager
    def _translate_errors(self, action: str, key: str) -> Iterator[None]:
        """Turn botocore errors into StorageError subclasses; the one place that does so."""
        where = f"{self.uri}/{key}" if key else self.uri
        try:
            yield
        except ClientError as exc:
            raise self._client_error(exc, action, where) from exc
        except NoCredentialsError as exc:
            raise StorageAuthError(
                f"no credentials for {self.uri}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            ) from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(
                f"cannot {action} {where} at {self.endpoint_url or 'the AWS endpoint'}: {exc}"
            ) from exc

    def _client_error(self, exc: ClientError, action: str, where: str) -> StorageError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = error.get("Message", "")
        if code == "NoSuchBucket":
            return StorageUnavailable(
                f"bucket {self.bucket!r} does not exist at "
                f"{self.endpoint_url or 'AWS'}: create it or fix the artifact URI {self.uri}"
            )
        if code in _NOT_FOUND_CODES:
            return ObjectNotFound(where)
        if code in _AUTH_CODES:
            return StorageAuthError(
                f"access denied to {where} ({code}): check the credentials "
                "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket policy"
            )
        return StorageError(f"S3 {action} {where} failed: {code} {message}".rstrip())


@functools.cache
def _shared_session(profile: str | None, region: str | None) -> aioboto3.Session:
    """One session per profile and region, so each new client reuses the loaded service model."""
    return aioboto3.Session(profile_name=profile, region_name=region)


def _read_range(path: Path, offset: int, length: int) -> bytearray:
    data = bytearray(length)
    with open(path, "rb", buffering=0) as source:
        source.seek(offset)
        read = source.readinto(data)
    if read != length:
        raise StorageError(
            f"{path} changed size during upload: expected {length} bytes at offset {offset}"
        )
    return data
