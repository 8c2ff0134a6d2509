"""The supervisor's report endpoint over real HTTP: per-job tokens and report parsing."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from gpujobs.supervisor.reports import TokenIssuer
from worker.protocol import REPORT_PATH, Report, ReportKind


def heartbeat(job_id: str) -> str:
    return Report(
        job_id=job_id, attempt=1, kind=ReportKind.HEARTBEAT, step=3, total_steps=10, sent_at=1.0
    ).to_json()


async def post(base_url: str, job_id: str, body: str, token: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    url = base_url + REPORT_PATH.format(job_id=job_id)
    async with aiohttp.ClientSession() as session, session.post(
        url, data=body, headers=headers
    ) as response:
        return response.status


async def test_right_token_accepted(report_endpoint, issuer: TokenIssuer) -> None:
    base_url, recorder = report_endpoint

    status = await post(base_url, "job-a", heartbeat("job-a"), issuer.token_for("job-a"))

    assert status == 200
    assert [report.job_id for report in recorder.reports] == ["job-a"]
    assert recorder.reports[0].step == 3


async def test_token_of_other_job_rejected(report_endpoint, issuer: TokenIssuer) -> None:
    base_url, recorder = report_endpoint

    status = await post(base_url, "job-a", heartbeat("job-a"), issuer.token_for("job-b"))

    assert status == 401
    assert recorder.reports == []


@pytest.mark.parametrize("token", [None, "", "not-a-token"])
async def test_missing_or_wrong_token_rejected(report_endpoint, token: str | None) -> None:
    base_url, recorder = report_endpoint

    status = await post(base_url, "job-a", heartbeat("job-a"), token)

    assert status == 401
    assert recorder.reports == []


async def test_body_for_other_job_rejected(report_endpoint, issuer: TokenIssuer) -> None:
    base_url, recorder = report_endpoint

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
