"""Datasets: push once by content, fetch into a verified cache, over a folder and a moto S3."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from gpujobs.cli_data import data_app
from gpujobs.datasets import DatasetPushFailed, push_dataset
from tests.worker.conftest import DUMMY_CREDENTIALS, create_bucket, start_moto, stop_process
from worker import protocol
from worker.datasets import (
    DatasetCorrupt,
    DatasetError,
    DatasetManifest,
    fetch_dataset,
    split_dataset_uri,
)


def push(root: str, path: Path):
    return asyncio.run(push_dataset(root, path))


@pytest.fixture
def source(tmp_path: Path) -> Path:
    folder = tmp_path / "source"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha\n")
    (folder / "sub" / "b.bin").write_bytes(bytes(range(256)) * 100)
    return folder


@pytest.fixture
def root(tmp_path: Path) -> str:
    return (tmp_path / "artifacts").as_uri()


def stored_folder(root: str, digest: str) -> Path:
    return Path(root.removeprefix("file://")) / protocol.DATASETS_DIR / digest


def test_push_then_fetch_folder(source: Path, root: str, tmp_path: Path) -> None:
    pushed = push(root, source)

    assert pushed.uri == f"{root}/{protocol.DATASETS_DIR}/{pushed.digest}"
    assert pushed.file_count == 2
    assert pushed.uploaded_files == 2
    manifest = DatasetManifest.from_json(
        (stored_folder(root, pushed.digest) / "manifest.json").read_bytes()
    )
    assert manifest.digest == pushed.digest
    assert sorted(item.path for item in manifest.files) == ["a.txt", "sub/b.bin"]

    local = fetch_dataset(pushed.uri, tmp_path / "cache")
    assert (local / "a.txt").read_text() == "alpha\n"
    assert (local / "sub" / "b.bin").read_bytes() == (source / "sub" / "b.bin").read_bytes()


def test_second_push_uploads_nothing(source: Path, root: str) -> None:
    first = push(root, source)
    second = push(root, source)

    assert second.digest == first.digest
    assert second.uploaded_files == 0


def test_changed_content_changes_digest(source: Path, root: str) -> None:
    first = push(root, source)
    (source / "a.txt").write_text("beta\n")

    assert (push(root, source)).digest != first.digest


def test_single_file_keeps_its_name(source: Path, root: str, tmp_path: Path) -> None:
    pushed = push(root, source / "a.txt")

    local = fetch_dataset(pushed.uri, tmp_path / "cache")

    assert [path.name for path in local.iterdir()] == ["a.txt"]


def test_corrupt_cache_fetched_again(
    source: Path, root: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="worker.datasets")
    pushed = push(root, source)
    cache = tmp_path / "cache"
    local = fetch_dataset(pushed.uri, cache)
    (local / "sub" / "b.bin").write_bytes(b"bit rot of the same size".ljust(25600, b"x"))
    (local / "a.txt").unlink()

    again = fetch_dataset(pushed.uri, cache)

    assert (again / "sub" / "b.bin").read_bytes() == (source / "sub" / "b.bin").read_bytes()
    assert (again / "a.txt").read_text() == "alpha\n"
    assert "does not match its checksum" in caplog.text
    assert "2 fetched" in caplog.text


def test_corrupt_store_raises(source: Path, root: str, tmp_path: Path) -> None:
    pushed = push(root, source)
    (stored_folder(root, pushed.digest) / "files" / "a.txt").write_text("tampered\n")

    with pytest.raises(DatasetCorrupt, match="push the dataset again"):
        fetch_dataset(pushed.uri, tmp_path / "cache")
    assert not (tmp_path / "cache" / protocol.DATASETS_DIR / pushed.digest / "a.txt").exists()


def test_swapped_manifest_rejected(source: Path, root: str, tmp_path: Path) -> None:
    pushed = push(root, source)
    manifest_path = stored_folder(root, pushed.digest) / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["files"] = data["files"][:1]
    manifest_path.write_text(json.dumps(data))

    with pytest.raises(DatasetCorrupt, match="names other files"):
        fetch_dataset(pushed.uri, tmp_path / "cache")


def test_bad_uri_and_missing_dataset(root: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="gpujobs data push"):
        split_dataset_uri(f"{root}/datasets/not-a-digest")
    with pytest.raises(DatasetError, match="not found"):
        fetch_dataset(f"{root}/datasets/{'0' * 64}", tmp_path / "cache")


def test_missing_path_fails_clearly(root: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetPushFailed, match="does not exist"):
        push(root, tmp_path / "nowhere")


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    process, url = start_moto()
    yield url
    stop_process(process)


def test_push_and_fetch_over_s3(
    source: Path, tmp_path: Path, moto_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in DUMMY_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("GPUJOBS_S3_ENDPOINT_URL", moto_url)
    monkeypatch.setenv("GPUJOBS_S3_PATH_STYLE", "1")
    root = f"s3://{create_bucket(moto_url)}/team"

    pushed = push(root, source)
    local = fetch_dataset(pushed.uri, tmp_path / "cache")

    assert pushed.uri.startswith(f"{root}/datasets/")
    assert (local / "sub" / "b.bin").read_bytes() == (source / "sub" / "b.bin").read_bytes()
    assert (push(root, source)).uploaded_files == 0


def test_push_command_prints_uri(
    source: Path, root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUJOBS_ARTIFACT_URI", root)
    app = typer.Typer()
    app.add_typer(data_app, name="data")

    result = CliRunner().invoke(app, ["data", "push", str(source)])

    assert result.exit_code == 0, result.output
    uri = result.stdout.strip().splitlines()[0]
    assert uri.startswith(f"{root}/datasets/")
    assert split_dataset_uri(uri)[1] == uri.rsplit("/", 1)[1]
