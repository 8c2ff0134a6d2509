"""The supervisor's report endpoint over real HTTP: per-job tokens and report parsing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gpujobs.supervisor.reports import ReportServer, TokenIssuer
from worker.protocol import REPORT_PATH, Report, ReportKind


class Recorder:
    """Report handler that keeps every report it is given."""

    def __init__(self) -> None:
        self.reports: list[Report] = []

    async def __call__(self, report: Report) -> str:
        self.reports.append(report)
        return "ok"


def heartbeat(job_id: str) -> str:
    return Report(
        job_id=job_id, attempt=1, kind=ReportKind.HEARTBEAT, step=3, total_steps=10, sent_at=1.0
    ).to_json()


@pytest.fixture
def issuer(tmp_path: Path) -> TokenIssuer:
    return TokenIssuer.from_home(tmp_path / "home")


@pytest.fixture
async def server(issuer: TokenIssuer) -> AsyncIterator[tuple[str, Recorder]]:
    recorder = Recorder()
    report_server = ReportServer(issuer, recorder)
    port = await report_server.start("127.0.0.1", 0)
    yield f"http://127.0.0.1:{port}", recorder
    await report_server.stop()


async def post(base_url: str, job_id: str, body: str, token: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    url = base_url + REPORT_PATH.format(job_id=job_id)
    async with aiohttp.ClientSession() as session, session.post(
        url, data=body, headers=headers
    ) as response:
        return response.status


async def test_right_token_accepted(server, issuer: TokenIssuer) -> None:
    base_url, recorder = server

    status = await post(base_url, "job-a", heartbeat("job-a"), issuer.token_for("job-a"))

    assert status == 200
    assert [report.job_id for report in recorder.reports] == ["job-a"]
    assert recorder.reports[0].step == 3


async def test_token_of_other_job_rejected(server, issuer: TokenIssuer) -> None:
    base_url, recorder = server

    status = await post(base_url, "job-a", heartbeat("job-a"), issuer.token_for("job-b"))

    assert status == 401
    assert recorder.reports == []


@pytest.mark.parametrize("token", [None, "", "not-a-token"])
async def test_missing_or_wrong_token_rejected(server, token: str | None) -> None:
    base_url, recorder = server

    status = await post(base_url, "job-a", heartbeat("job-a"), token)

    assert status == 401
    assert recorder.reports == []


async def test_body_for_other_job_rejected(server, issuer: TokenIssuer) -> None:
    base_url, recorder = server

    status = await post(base_url, "job-a", heartbeat("job-b"), issuer.token_for("job-a"))

    assert status == 400
    assert recorder.reports == []


def test_tokens_survive_restart(tmp_path: Path) -> None:
    first = TokenIssuer.from_home(tmp_path / "home")
    second = TokenIssuer.from_home(tmp_path / "home")
    other_home = TokenIssuer.from_home(tmp_path / "other")

    assert second.check("job-a", first.token_for("job-a"))
    assert not other_home.check("job-a", first.token_for("job-a"))
    assert (tmp_path / "home" / "supervisor.secret").stat().st_mode & 0o077 == 0
