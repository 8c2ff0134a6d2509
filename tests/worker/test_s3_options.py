"""S3 region and AWS profile options, checked in the signatures that reach a moto server.

A recording proxy in front of the server reads the credential scope (access key id and
region) of every signed request, for the async client and the part upload threads alike.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import boto3
import pytest

from tests.worker.conftest import MIB, make_s3_storage
from tests.worker.processes import run_worker, worker_env
from tests.worker.slow_proxy import SlowProxy
from worker import protocol
from worker.checkpoint_store import find_latest_checkpoint
from worker.storage import StorageAuthError, open_storage

PROFILE_KEY_ID = "AKIAPROFILEEXAMPLE"
ENV_KEY_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


@pytest.fixture
def recorder(moto_url: str) -> Iterator[SlowProxy]:
    proxy = SlowProxy(urlparse(moto_url).port, None)
    proxy.start()
    yield proxy
    proxy.stop()


def write_credentials(folder: Path, profile: str) -> Path:
    """Write an AWS shared credentials file with one profile; return its path."""
    path = folder / ".aws" / "credentials"
    path.parent.mkdir(parents=True)
    path.write_text(
        f"[{profile}]\naws_access_key_id = {PROFILE_KEY_ID}\n"
        "aws_secret_access_key = profile-secret\n"
    )
    return path


async def write_small_and_multipart(storage) -> None:
    payload = bytes(range(256)) * (3 * MIB // 256)
    await storage.put_bytes("small.txt", b"hello")
    await storage.put_bytes("large.bin", payload)
    assert await storage.get_bytes("small.txt") == b"hello"
    assert await storage.get_bytes("large.bin") == payload


async def latest_checkpoint(moto_url: str, bucket: str):
    storage = make_s3_storage(moto_url, bucket, prefix="job-test")
    try:
        return await find_latest_checkpoint(storage)
    finally:
        await storage.close()


async def test_region_used_for_signing(recorder: SlowProxy, moto_url: str) -> None:
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_url, region_name="eu-west-1").create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
    )
    endpoint = f"http://127.0.0.1:{recorder.port}"
    storage = make_s3_storage(endpoint, bucket, region="eu-west-1", part_size_bytes=MIB)
    try:
        await write_small_and_multipart(storage)
    finally:
        await storage.close()

    regions = {region for _, region in recorder.credential_scopes}
    assert len(recorder.credential_scopes) >= 3 + 4  # put, multipart with 3 parts, gets
    assert regions == {"eu-west-1"}


async def test_profile_credentials_used(
    recorder: SlowProxy, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    profile = f"gpujobs-{uuid.uuid4().hex[:8]}"  # sessions are cached per profile name
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(write_credentials(tmp_path, profile)))
    for name in ENV_KEY_NAMES:
        monkeypatch.delenv(name)
    endpoint = f"http://127.0.0.1:{recorder.port}"
    storage = make_s3_storage(endpoint, s3_bucket, profile=profile, part_size_bytes=MIB)
    try:
        await write_small_and_multipart(storage)
    finally:
        await storage.close()

    key_ids = {key_id for key_id, _ in recorder.credential_scopes}
    assert len(recorder.credential_scopes) >= 3 + 4
    assert key_ids == {PROFILE_KEY_ID}


def test_unknown_profile_rejected(s3_bucket: str, moto_url: str) -> None:
    with pytest.raises(StorageAuthError, match="'no-such-profile' not found"):
        open_storage(f"s3://{s3_bucket}/job", endpoint_url=moto_url, profile="no-such-profile")


def test_worker_uses_aws_profile_env(
    recorder: SlowProxy, moto_url: str, s3_bucket: str, tmp_path: Path
) -> None:
    credentials = write_credentials(tmp_path, "training")
    env = worker_env(
        tmp_path / "unused",
        GPUJOBS_ARTIFACT_URI=f"s3://{s3_bucket}/job-test",
        GPUJOBS_S3_ENDPOINT_URL=f"http://127.0.0.1:{recorder.port}",
        GPUJOBS_S3_PATH_STYLE="1",
        GPUJOBS_TOTAL_STEPS="20",
        GPUJOBS_CHECKPOINT_EVERY="10",
        HOME=str(tmp_path),
        AWS_SHARED_CREDENTIALS_FILE=str(credentials),
        AWS_PROFILE="training",
        AWS_DEFAULT_REGION="ap-southeast-2",
        AWS_EC2_METADATA_DISABLED="true",
    )

    worker = run_worker(["train-digits"], env)

    assert worker.process.returncode == protocol.EXIT_OK, worker.output()
    assert set(recorder.credential_scopes) == {(PROFILE_KEY_ID, "ap-southeast-2")}
    ref = asyncio.run(latest_checkpoint(moto_url, s3_bucket))
    assert ref is not None
    assert ref.step == 10
