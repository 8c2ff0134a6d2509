"""Storage contract over file:// and s3:// (a moto server process), plus S3-only cases."""

from __future__ import annotations

import asyncio
import base64
import os
import zlib
from pathlib import Path

import boto3
import pytest

from tests.worker.conftest import MIB, make_s3_storage, start_moto, stop_process
from worker.storage import (
    InvalidKey,
    LocalStorage,
    ObjectNotFound,
    StorageAuthError,
    StorageError,
    StorageUnavailable,
    object_uri,
    open_storage,
    preflight,
)


async def test_put_then_get_bytes(storage) -> None:
    await storage.put_bytes("a/b/c.bin", b"hello")

    assert await storage.get_bytes("a/b/c.bin") == b"hello"
    assert await storage.exists("a/b/c.bin")


async def test_put_overwrites_whole_object(storage) -> None:
    await storage.put_bytes("x.txt", b"first version, longer")
    await storage.put_bytes("x.txt", b"second")

    assert await storage.get_bytes("x.txt") == b"second"


async def test_get_missing_raises_not_found(storage) -> None:
    with pytest.raises(ObjectNotFound) as caught:
        await storage.get_bytes("missing/key")

    assert "missing/key" in str(caught.value)


async def test_exists_false_for_missing(storage) -> None:
    assert not await storage.exists("nothing-here")


async def test_delete_missing_is_not_error(storage) -> None:
    await storage.put_bytes("gone", b"1")
    await storage.delete("gone")
    await storage.delete("gone")

    assert not await storage.exists("gone")


async def test_list_by_prefix_sorted(storage) -> None:
    for key in ("b/2", "a/1", "a/3", "ab", "c/a/1"):
        await storage.put_bytes(key, b"x")

    assert await storage.list() == ["a/1", "a/3", "ab", "b/2", "c/a/1"]
    assert await storage.list("a/") == ["a/1", "a/3"]
    assert await storage.list("a") == ["a/1", "a/3", "ab"]
    assert await storage.list("c/") == ["c/a/1"]
    assert await storage.list("zzz/") == []


async def test_put_file_and_get_file(storage, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(300_000))
    target = tmp_path / "target.bin"

    await storage.put_file("files/source.bin", source)
    await storage.get_file("files/source.bin", target)

    assert target.read_bytes() == source.read_bytes()


async def test_get_file_missing_raises(storage, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound):
        await storage.get_file("nope.bin", tmp_path / "nope.bin")

    assert not (tmp_path / "nope.bin").exists()


@pytest.mark.parametrize("key", ["", "/abs", "../escape", "a/../../b", "a//b", "a/./b"])
async def test_invalid_keys_rejected(storage, key: str) -> None:
    with pytest.raises(InvalidKey):
        await storage.put_bytes(key, b"x")


async def test_list_rejects_parent_prefix(storage) -> None:
    with pytest.raises(InvalidKey):
        await storage.list("../")


async def test_preflight_passes_and_leaves_nothing(storage) -> None:
    await preflight(storage)

    assert await storage.list() == []


async def test_object_uri_names_backend(storage) -> None:
    uri = object_uri(storage, "checkpoints/step-1/payload.pt")

    assert uri.startswith(("file:///", "s3://"))
    assert uri.endswith("/checkpoints/step-1/payload.pt")


# Folder backend only.


async def test_local_write_leaves_no_temp_files(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    for index in range(5):
        await storage.put_bytes("dir/obj", str(index).encode())

    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["obj"]


async def test_local_list_hides_partial_files(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    await storage.put_bytes("dir/real", b"1")
    (tmp_path / "dir" / ".partial-abc").write_bytes(b"half")

    assert await storage.list() == ["dir/real"]


def test_local_root_must_be_absolute() -> None:
    with pytest.raises(StorageError):
        LocalStorage(Path("relative/root"))


@pytest.mark.parametrize("uri", ["ftp://host/x", "file://host/x", "s3:///prefix"])
def test_open_storage_rejects_bad_uri(uri: str) -> None:
    with pytest.raises(StorageError) as caught:
        open_storage(uri)

    assert uri in str(caught.value)


async def test_preflight_fails_on_read_only_folder(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        target = tmp_path / "file-not-folder"
        target.write_bytes(b"")
        storage = LocalStorage(target)
    else:
        target = tmp_path / "ro"
        target.mkdir(mode=0o500)
        storage = LocalStorage(target)

    with pytest.raises(StorageUnavailable) as caught:
        await preflight(storage)

    assert str(target) in str(caught.value)


# S3 backend only.


def _pending_uploads(moto_url: str, bucket: str) -> list[dict]:
    client = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
    return client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


async def test_s3_multipart_roundtrip(moto_url: str, s3_bucket: str, tmp_path: Path) -> None:
    storage = make_s3_storage(moto_url, s3_bucket, part_size_bytes=MIB, parts_in_flight=2)
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(3 * MIB + 123))
    try:
        await storage.put_file("big.bin", source)
        await storage.put_bytes("big-bytes.bin", source.read_bytes())

        assert await storage.get_bytes("big.bin") == source.read_bytes()
        assert await storage.get_bytes("big-bytes.bin") == source.read_bytes()
        assert _pending_uploads(moto_url, s3_bucket) == []
    finally:
        await storage.close()


@pytest.mark.parametrize("part_checksums", [True, False])
async def test_s3_multipart_part_checksums(
    moto_url: str, s3_bucket: str, part_checksums: bool
) -> None:
    storage = make_s3_storage(
        moto_url, s3_bucket, part_size_bytes=MIB, part_checksums=part_checksums
    )
    payload = os.urandom(2 * MIB + 7)
    try:
        await storage.put_bytes("checked.bin", payload)
        assert await storage.get_bytes("checked.bin") == payload
    finally:
        await storage.close()

    client = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
    head = client.head_object(Bucket=s3_bucket, Key="job-1/checked.bin", ChecksumMode="ENABLED")
    assert ("ChecksumCRC32" in head) == part_checksums
    if part_checksums:
        # A composite checksum: the CRC32 of the parts' CRC32s, in order.
        parts = [payload[offset : offset + MIB] for offset in range(0, len(payload), MIB)]
        joined = b"".join(zlib.crc32(part).to_bytes(4, "big") for part in parts)
        expected = base64.b64encode(zlib.crc32(joined).to_bytes(4, "big")).decode()
        assert head["ChecksumCRC32"].split("-")[0] == expected


def test_part_checksums_env_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUJOBS_S3_PART_CHECKSUMS", "maybe")

    with pytest.raises(StorageError, match="invalid GPUJOBS_S3_PART_CHECKSUMS='maybe'"):
        open_storage("s3://bucket/prefix")

    monkeypatch.setenv("GPUJOBS_S3_PART_CHECKSUMS", "0")
    assert open_storage("s3://bucket/prefix").part_checksums is False


async def test_s3_multipart_aborted_on_failure(moto_url: str, s3_bucket: str) -> None:
    # Parts below the server's minimum size are rejected when the upload completes.
    storage = make_s3_storage(moto_url, s3_bucket, part_size_bytes=256 * 1024)
    try:
        with pytest.raises(StorageError) as caught:
            await storage.put_bytes("too-small-parts.bin", os.urandom(MIB + 5))

        assert "EntityTooSmall" in str(caught.value)
        assert _pending_uploads(moto_url, s3_bucket) == []
        assert not await storage.exists("too-small-parts.bin")
    finally:
        await storage.close()


async def test_s3_multipart_aborted_on_cancel(moto_url: str, s3_bucket: str) -> None:
    storage = make_s3_storage(moto_url, s3_bucket, part_size_bytes=MIB, parts_in_flight=1)
    client = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
    try:
        seen_in_progress = False
        for _ in range(5):  # retried in case one upload finishes before the poll sees it
            task = asyncio.create_task(storage.put_bytes("cancelled.bin", os.urandom(4 * MIB)))
            while not task.done():
                uploads = await asyncio.to_thread(client.list_multipart_uploads, Bucket=s3_bucket)
                if uploads.get("Uploads"):
                    seen_in_progress = True
                    task.cancel()
                    break
            with pytest.raises(asyncio.CancelledError) if seen_in_progress else _no_raise():
                await task
            if seen_in_progress:
                break
            await storage.delete("cancelled.bin")

        assert seen_in_progress
        assert _pending_uploads(moto_url, s3_bucket) == []
        assert not await storage.exists("cancelled.bin")
    finally:
        await storage.close()


async def test_s3_multipart_cancelled_during_create(
    moto_url: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = make_s3_storage(moto_url, s3_bucket, part_size_bytes=MIB)
    try:
        client = await storage._get_client()
        created = asyncio.Event()
        create = client.create_multipart_upload

        async def create_with_slow_reply(**kwargs):
            response = await create(**kwargs)
            created.set()
            await asyncio.sleep(0.5)  # the server has the upload; its id is still on the way
            return response

        monkeypatch.setattr(client, "create_multipart_upload", create_with_slow_reply)
        task = asyncio.create_task(storage.put_bytes("cancelled.bin", os.urandom(2 * MIB)))
        await created.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        assert _pending_uploads(moto_url, s3_bucket) == []
        assert not await storage.exists("cancelled.bin")
    finally:
        await storage.close()


class _no_raise:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info) -> bool:
        return False


async def test_s3_lists_past_one_page(moto_url: str, s3_bucket: str) -> None:
    storage = make_s3_storage(moto_url, s3_bucket)
    keys = [f"many/{index:05d}" for index in range(1005)]
    limit = asyncio.Semaphore(32)

    async def put(key: str) -> None:
        async with limit:
            await storage.put_bytes(key, b"")

    try:
        await asyncio.gather(*(put(key) for key in keys))
        await storage.put_bytes("other/1", b"")

        assert await storage.list("many/") == keys
        assert len(await storage.list()) == 1006
    finally:
        await storage.close()


async def test_s3_prefix_isolates_jobs(moto_url: str, s3_bucket: str) -> None:
    first = make_s3_storage(moto_url, s3_bucket, prefix="job-1")
    second = make_s3_storage(moto_url, s3_bucket, prefix="job-10")
    try:
        await first.put_bytes("k", b"1")
        await second.put_bytes("k", b"10")

        assert await first.list() == ["k"]
        assert await first.get_bytes("k") == b"1"
        assert first.uri == f"s3://{s3_bucket}/job-1"
    finally:
        await first.close()
        await second.close()


async def test_preflight_missing_bucket_is_clear(moto_url: str) -> None:
    storage = make_s3_storage(moto_url, "no-such-bucket-here")
    try:
        with pytest.raises(StorageUnavailable) as caught:
            await preflight(storage)

        assert "no-such-bucket-here" in str(caught.value)
        assert "does not exist" in str(caught.value)
    finally:
        await storage.close()


async def test_preflight_unreachable_endpoint_fails_fast() -> None:
    from tests.worker.conftest import free_port

    storage = make_s3_storage(
        f"http://127.0.0.1:{free_port()}", "bucket", connect_timeout_s=1, max_attempts=1
    )
    try:
        with pytest.raises(StorageUnavailable) as caught:
            await preflight(storage, timeout_s=10)

        assert "127.0.0.1" in str(caught.value)
    finally:
        await storage.close()


async def test_preflight_bad_credentials_is_clear() -> None:
    # This server checks signatures against its own IAM users, so the dummy key is unknown.
    process, url = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    storage = make_s3_storage(url, "any-bucket")
    try:
        with pytest.raises(StorageAuthError) as caught:
            await preflight(storage)

        assert "AWS_ACCESS_KEY_ID" in str(caught.value)
        assert "testing" not in str(caught.value)
    finally:
        await storage.close()
        stop_process(process)
