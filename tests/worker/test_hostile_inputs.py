"""Corrupt or hostile data: manifests, report bodies, completion markers and configuration."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import aiohttp
import pytest

from gpujobs.supervisor.mailbox import _read
from gpujobs.supervisor.reports import TokenIssuer
from tests.worker.processes import run_worker, worker_env
from worker import protocol
from worker.artifacts import write_final_artifacts
from worker.checkpoint_store import list_checkpoints, load_latest_checkpoint, write_checkpoint
from worker.config import WorkerConfig
from worker.datasets import DatasetCorrupt, DatasetManifest
from worker.errors import ConfigError
from worker.protocol import CompletionMarker, InvalidCompletionMarker, Report, ReportKind
from worker.storage import LocalStorage
from worker.wire import MAX_WIRE_INT

SHA = "a" * 64
HUGE_STEP = 99999999999999999999999
STARTED = r"started at step (\d+) of \d+ \((.*)\)"


def manifest_text(step: object = 20, **fields: object) -> str:
    body = {"step": step, "sha256": SHA, "size_bytes": 1, "created_at": 1.0, **fields}
    return json.dumps(body)


HOSTILE_MANIFESTS = {
    "infinite step": manifest_text().replace('"step": 20', '"step": Infinity'),
    "huge size": manifest_text().replace('"size_bytes": 1', '"size_bytes": 1e400'),
    "size above 2**53": manifest_text(size_bytes=MAX_WIRE_INT + 1),
    "NaN time": manifest_text().replace('"created_at": 1.0', '"created_at": NaN'),
    "deep nesting": "[" * 5000 + "]" * 5000,
    "payload path": manifest_text(payload="../step-000000000010/payload.pt"),
    "absolute payload": manifest_text(payload="/etc/passwd"),
    "oversized": manifest_text(padding="x" * 100_000),
    "array": "[1]",
    "float step": manifest_text(step=20.5),
    "string step": manifest_text(step="20"),
    "bad digest": manifest_text(sha256="../.."),
    "not UTF-8": b"\xff\xfe{",
}


def plant_folder(store: Path, folder: str, manifest: str | bytes) -> None:
    path = store / protocol.CHECKPOINTS_DIR / folder
    path.mkdir(parents=True)
    (path / protocol.PAYLOAD_NAME).write_bytes(b"x")
    data = manifest.encode() if isinstance(manifest, str) else manifest
    (path / protocol.MANIFEST_NAME).write_bytes(data)


@pytest.mark.parametrize("case", sorted(HOSTILE_MANIFESTS))
async def test_hostile_manifest_skipped(tmp_path: Path, caplog, case: str) -> None:
    storage = LocalStorage(tmp_path)
    await write_checkpoint(storage, 10, b"valid")
    plant_folder(tmp_path, "step-000000000020", HOSTILE_MANIFESTS[case])

    with caplog.at_level(logging.WARNING, logger="worker.checkpoint_store"):
        found = await load_latest_checkpoint(storage)

    assert found is not None
    assert found[0].step == 10
    assert found[1] == b"valid"
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert "checkpoints/step-000000000020/manifest.json" in warnings[0]
    assert "invalid checkpoint manifest" in warnings[0]
    assert "\n" not in warnings[0]


async def test_huge_step_folder_skipped(tmp_path: Path, caplog) -> None:
    storage = LocalStorage(tmp_path)
    await write_checkpoint(storage, 10, b"valid")
    plant_folder(tmp_path, f"step-{HUGE_STEP}", manifest_text(step=HUGE_STEP))
    plant_folder(tmp_path, "step-" + "9" * 240, manifest_text())

    with caplog.at_level(logging.WARNING, logger="worker.checkpoint_store"):
        listed = await list_checkpoints(storage)

    assert [item.step for item in listed] == [10]
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert all("above the maximum" in message for message in messages)


def test_manifest_step_bounds() -> None:
    top = protocol.CheckpointManifest.from_json(manifest_text(step=MAX_WIRE_INT))

    assert top.step == MAX_WIRE_INT
    for step in (MAX_WIRE_INT + 1, -1, True, None):
        with pytest.raises(protocol.InvalidManifest):
            protocol.CheckpointManifest.from_json(manifest_text(step=step))


def test_worker_resumes_past_hostile_manifests(tmp_path: Path) -> None:
    store = tmp_path / "store"
    env = worker_env(store, GPUJOBS_TOTAL_STEPS="100", GPUJOBS_CHECKPOINT_EVERY="50")
    first = run_worker(["train-digits"], env)
    assert first.process.returncode == protocol.EXIT_OK, first.output()
    (store / protocol.COMPLETION_MARKER).unlink()
    plant_folder(store, "step-000000000070", HOSTILE_MANIFESTS["infinite step"])
    plant_folder(store, "step-000000000080", HOSTILE_MANIFESTS["deep nesting"])
    plant_folder(store, "step-000000000090", HOSTILE_MANIFESTS["payload path"].replace("20", "90"))
    plant_folder(store, f"step-{HUGE_STEP}", manifest_text(step=HUGE_STEP))

    again = run_worker(["train-digits"], worker_env(store, attempt=2, GPUJOBS_TOTAL_STEPS="100"))

    assert again.process.returncode == protocol.EXIT_OK, again.output()
    started = again.find(STARTED)
    assert [match.group(2) for match in started] == ["resumed from step 50"]
    for step in ("70", "80", "90"):
        assert again.find(rf"skipping checkpoint checkpoints/step-0+{step}/manifest.json")
    assert again.find(rf"skipping checkpoint folder checkpoints/step-{HUGE_STEP}")
    report = Report.from_json((store / protocol.MAILBOX_KEY).read_bytes())
    assert report.kind is ReportKind.COMPLETED
    assert report.resumed_from_step == 50


# --- report bodies over real HTTP ---------------------------------------------------------


def report_body(**fields: object) -> dict[str, object]:
    body = json.loads(
        Report(
            job_id="job-a", attempt=1, kind=ReportKind.STARTED, step=3, total_steps=10, sent_at=1.0
        ).to_json()
    )
    body.update(fields)
    return body


def checkpoint_body(**fields: object) -> dict[str, object]:
    return {"step": 5, "uri": "file:///x/payload.pt", "sha256": SHA, "size_bytes": 3, **fields}


HOSTILE_REPORTS: dict[str, str | bytes] = {
    "array body": "[1]",
    "string body": '"report"',
    "null body": "null",
    "huge resumed step": json.dumps(report_body(resumed_from_step=HUGE_STEP)),
    "step above 2**53": json.dumps(report_body(step=MAX_WIRE_INT + 1)),
    "negative step": json.dumps(report_body(step=-1)),
    "string step": json.dumps(report_body(step="3")),
    "boolean attempt": json.dumps(report_body(attempt=True)),
    "NaN sent_at": json.dumps(report_body(sent_at=math.nan)),
    "infinite metric": json.dumps(report_body(metrics={"loss": 1.0})).replace("1.0}", "1e400}"),
    "metrics array": json.dumps(report_body(metrics=[1.0])),
    "unknown kind": json.dumps(report_body(kind="exploded")),
    "kind array": json.dumps(report_body(kind=["started"])),
    "long job id": json.dumps(report_body(job_id="j" * 300)),
    "long error": json.dumps(report_body(error="e" * 10_000)),
    "exit code 256": json.dumps(report_body(exit_code=256)),
    "checkpoint huge step": json.dumps(report_body(last_checkpoint=checkpoint_body(step=10**30))),
    "checkpoint array": json.dumps(report_body(last_checkpoint=[1])),
    "checkpoint empty": json.dumps(report_body(last_checkpoint={})),
    "checkpoint bad digest": json.dumps(report_body(last_checkpoint=checkpoint_body(sha256="ab"))),
    "missing field": json.dumps(report_body(step=None)).replace('"step": null, ', ""),
    "deep nesting": "[" * 50_000 + "]" * 50_000,
    "oversized": json.dumps(report_body(padding="x" * 100_000)),
    "not UTF-8": b"\xff\xfe{}",
}


async def post(base_url: str, body: str | bytes, token: str) -> tuple[int, dict]:
    url = base_url + protocol.REPORT_PATH.format(job_id="job-a")
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session, session.post(
        url, data=body, headers=headers
    ) as response:
        return response.status, await response.json()


@pytest.mark.parametrize("case", sorted(HOSTILE_REPORTS))
async def test_hostile_report_rejected(
    report_endpoint, issuer: TokenIssuer, caplog, case: str
) -> None:
    base_url, recorder = report_endpoint

    with caplog.at_level(logging.WARNING, logger="gpujobs.supervisor.reports"):
        status, answer = await post(base_url, HOSTILE_REPORTS[case], issuer.token_for("job-a"))

    assert status == 400
    assert recorder.reports == []
    assert answer["ok"] is False
    assert answer["error"].startswith("invalid report: ")
    assert "\n" not in answer["error"]
    assert len(answer["error"]) < 300
    logged = [record.getMessage() for record in caplog.records]
    assert logged == [f"rejected a report for job job-a: {answer['error']}"]


async def test_valid_report_still_accepted(report_endpoint, issuer: TokenIssuer) -> None:
    base_url, recorder = report_endpoint
    body = json.dumps(report_body(resumed_from_step=MAX_WIRE_INT, metrics={"loss": 0.5}))

    status, answer = await post(base_url, body, issuer.token_for("job-a"))

    assert status == 200
    assert answer == {"ok": True}
    assert recorder.reports[0].resumed_from_step == MAX_WIRE_INT
    assert recorder.reports[0].metrics == {"loss": 0.5}


def test_report_with_nan_metric_round_trips() -> None:
    report = Report(
        job_id="job-a", attempt=1, kind=ReportKind.HEARTBEAT, step=3, total_steps=10,
        sent_at=1.0, metrics={"loss": math.nan, "lr": 0.1}, error="e" * 20_000,
    )  # fmt: skip

    parsed = Report.from_json(report.to_json())

    assert parsed.metrics == {"lr": 0.1}
    assert parsed.error is not None
    assert len(parsed.error) <= 8192
    assert parsed.error.startswith("eee")



class ArtifactRoot:
    """The one part of the supervisor that reading a mailbox uses: each job's artifact URI."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def artifact_uri(self, job_id: str) -> str:
        return f"file://{self.root / job_id}"


@pytest.mark.parametrize("case", ["array body", "huge resumed step", "NaN sent_at", "not UTF-8"])
async def test_hostile_mailbox_ignored(tmp_path: Path, caplog, case: str) -> None:
    mailbox = tmp_path / "job-a" / protocol.MAILBOX_KEY
    mailbox.parent.mkdir(parents=True)
    body = HOSTILE_REPORTS[case]
    mailbox.write_bytes(body.encode() if isinstance(body, str) else body)

    with caplog.at_level(logging.WARNING, logger="gpujobs.supervisor.mailbox"):
        report = await _read(ArtifactRoot(tmp_path), "job-a")

    assert report is None
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert messages[0].startswith("job job-a: the report mailbox holds an invalid report: ")


async def test_valid_mailbox_read(tmp_path: Path) -> None:
    mailbox = tmp_path / "job-a" / protocol.MAILBOX_KEY
    mailbox.parent.mkdir(parents=True)
    mailbox.write_text(json.dumps(report_body(resumed_from_step=50)))

    report = await _read(ArtifactRoot(tmp_path), "job-a")

    assert report is not None
    assert report.resumed_from_step == 50

def test_empty_error_accepted() -> None:
    body = json.dumps(report_body(kind="failed", error="", exit_code=1))

    report = Report.from_json(body)

    assert report.error == ""
    assert report.exit_code == 1


# --- completion markers --------------------------------------------------------------------


def marker_text(**fields: object) -> str:
    body = {"job_id": "job-a", "attempt": 1, "step": 10, "completed_at": 1.0, "metrics": {}}
    return json.dumps({**body, **fields})


HOSTILE_MARKERS = {
    "infinite step": marker_text().replace('"step": 10', '"step": Infinity'),
    "step above 2**53": marker_text(step=MAX_WIRE_INT + 1),
    "huge step": marker_text(step=10**30),
    "NaN completion time": marker_text().replace('"completed_at": 1.0', '"completed_at": NaN'),
    "NaN step": marker_text().replace('"step": 10', '"step": NaN'),
    "string metric": marker_text(metrics={"loss": "low"}),
    "array body": "[1]",
    "number body": "7",
    "null body": "null",
    "missing job id": json.dumps({"attempt": 1, "step": 10, "completed_at": 1.0}),
    "deep nesting": "[" * 5000 + "]" * 5000,
    "not JSON": "COMPLETED",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_MARKERS))
def test_hostile_marker_rejected(case: str) -> None:
    with pytest.raises(InvalidCompletionMarker) as caught:
        CompletionMarker.from_json(HOSTILE_MARKERS[case])

    assert isinstance(caught.value, ValueError)
    assert str(caught.value).startswith("invalid completion marker: ")
    assert "\n" not in str(caught.value)


def test_marker_drops_non_finite_metrics() -> None:
    metrics = '{"train_loss": NaN, "loss": 1e999, "low": -Infinity, "test_accuracy": 0.9}'
    text = marker_text().replace('"metrics": {}', f'"metrics": {metrics}')

    marker = CompletionMarker.from_json(text)

    assert marker.metrics == {"test_accuracy": 0.9}
    assert marker.step == 10


async def test_marker_writes_nan_metric_as_null(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    metrics = {"test_accuracy": 0.9, "train_loss": math.nan}
    marker = CompletionMarker("job-a", 1, 10, 1.0, metrics)

    await write_final_artifacts(storage, b"model", metrics, marker)

    text = (tmp_path / protocol.COMPLETION_MARKER).read_text()
    assert json.loads(text)["metrics"] == {"test_accuracy": 0.9, "train_loss": None}
    assert "NaN" not in text
    assert "NaN" not in (tmp_path / "final/metrics.json").read_text()
    assert CompletionMarker.from_json(text).metrics == {"test_accuracy": 0.9}


def test_marker_of_other_job_ignored(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    other = CompletionMarker("j", 1, 60, 1.0, {"test_accuracy": 0.5})
    (store / protocol.COMPLETION_MARKER).write_text(other.to_json())

    worker = run_worker(
        ["train-digits"], worker_env(store, GPUJOBS_JOB_ID="j2", GPUJOBS_TOTAL_STEPS="20")
    )

    assert worker.process.returncode == protocol.EXIT_OK, worker.output()
    assert worker.find(r"ignoring the completion marker .* belongs to job 'j', not 'j2'")
    assert "already completed" not in worker.output()
    assert len(worker.find(STARTED)) == 1
    marker = CompletionMarker.from_json((store / protocol.COMPLETION_MARKER).read_bytes())
    assert marker.job_id == "j2"
    assert marker.step == 20


def test_corrupt_marker_exits_bad_checkpoint(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / protocol.COMPLETION_MARKER).write_text(HOSTILE_MARKERS["infinite step"])

    worker = run_worker(["train-digits"], worker_env(store))

    assert worker.process.returncode == protocol.EXIT_BAD_CHECKPOINT, worker.output()
    report = Report.from_json((store / protocol.MAILBOX_KEY).read_bytes())
    assert report.kind is ReportKind.FAILED
    assert "invalid completion marker" in (report.error or "")
    assert not worker.find(STARTED)


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GPUJOBS_DEVICE", "tpu"),
        ("GPUJOBS_DEVICE", "cuda:x"),
        ("GPUJOBS_HEARTBEAT_INTERVAL_S", "nan"),
        ("GPUJOBS_HEARTBEAT_INTERVAL_S", "inf"),
        ("GPUJOBS_GRACE_PERIOD_S", "nan"),
        ("GPUJOBS_TOTAL_STEPS", str(MAX_WIRE_INT + 1)),
    ],
)
def test_invalid_setting_rejected(tmp_path: Path, name: str, value: str) -> None:
    env = worker_env(tmp_path / "store", **{name: value})

    with pytest.raises(ConfigError) as caught:
        WorkerConfig.from_env(env)

    assert f"{name}=" in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_known_devices_accepted(tmp_path: Path, device: str) -> None:
    env = worker_env(tmp_path / "store", GPUJOBS_DEVICE=device)

    assert WorkerConfig.from_env(env).device == device


@pytest.mark.parametrize(
    ("name", "value"), [("GPUJOBS_DEVICE", "tpu"), ("GPUJOBS_HEARTBEAT_INTERVAL_S", "nan")]
)
def test_invalid_setting_exits_78(tmp_path: Path, name: str, value: str) -> None:
    worker = run_worker(["train-digits"], worker_env(tmp_path / "store", **{name: value}))

    assert worker.process.returncode == protocol.EXIT_BAD_CONFIG, worker.output()
    errors = worker.find(rf"invalid {name}=")
    assert len(errors) == 1
    assert "Traceback" not in worker.output()
    assert not (tmp_path / "store" / protocol.MAILBOX_KEY).exists()



# --- dataset manifests ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "[" * 5000 + "]" * 5000,
        '{"files": [{"path": "a", "size_bytes": 1e400, "sha256": "x"}], "format_version": 1}',
        "[1]",
        '{"files": [], "format_version": NaN}',
    ],
)
def test_hostile_dataset_manifest_rejected(text: str) -> None:
    with pytest.raises(DatasetCorrupt) as caught:
        DatasetManifest.from_json(text)

    assert str(caught.value).startswith("invalid dataset manifest: ")
