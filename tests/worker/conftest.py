"""Fixtures for the worker tests: a moto S3 server process, storages over both backends, and
the supervisor's report endpoint on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gpujobs.supervisor.reports import ReportServer, TokenIssuer
from worker.protocol import Report
from worker.storage import Storage, open_storage
from worker.storage.s3 import S3Storage

MIB = 1024 * 1024
# The moto server accepts parts from 1 MiB, so multipart tests need only a few MB.
MOTO_PART_MIN_SIZE_BYTES = MIB
DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_moto(extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start `python -m moto.server` on 127.0.0.1 and wait until it accepts connections."""
    port = free_port()
    env = {**os.environ, **DUMMY_CREDENTIALS, **(extra_env or {})}
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"moto server exited with {process.returncode}")
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("moto server did not start within 30 s")


def stop_process(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    process, url = start_moto({"S3_UPLOAD_PART_MIN_SIZE": str(MOTO_PART_MIN_SIZE_BYTES)})
    yield url
    stop_process(process)


@pytest.fixture(autouse=True)
def dummy_aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test away from real AWS credentials and the instance metadata service."""
    for name, value in DUMMY_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "GPUJOBS_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


def make_s3_storage(moto_url: str, bucket: str, prefix: str = "job-1", **options) -> S3Storage:
    storage = open_storage(
        f"s3://{bucket}/{prefix}", endpoint_url=moto_url, path_style=True, **options
    )
    assert isinstance(storage, S3Storage)
    return storage


def create_bucket(moto_url: str) -> str:
    import boto3

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def s3_bucket(moto_url: str) -> str:
    return create_bucket(moto_url)


@pytest.fixture(params=["file", "s3"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    """The same storage contract over both backends."""
    if request.param == "file":
        backend: Storage = open_storage(f"file://{tmp_path / 'store'}")
    else:
        moto_url = request.getfixturevalue("moto_url")
        backend = make_s3_storage(moto_url, create_bucket(moto_url))
    yield backend
    await backend.close()


class Recorder:
    """Report handler that keeps every report it is given."""

    def __init__(self) -> None:
        self.reports: list[Report] = []

    async def __call__(self, report: Report) -> str:
        self.reports.append(report)
        return "ok"


@pytest.fixture
def issuer(tmp_path: Path) -> TokenIssuer:
    return TokenIssuer.from_home(tmp_path / "home")


@pytest.fixture
async def report_endpoint(issuer: TokenIssuer) -> AsyncIterator[tuple[str, Recorder]]:
    """A ReportServer on a free port: its base URL and the recorder of accepted reports."""
    recorder = Recorder()
    report_server = ReportServer(issuer, recorder)
    port = await report_server.start("127.0.0.1", 0)
    yield f"http://127.0.0.1:{port}", recorder
    await report_server.stop()
