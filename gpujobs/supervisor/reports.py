"""The HTTP endpoint workers report to, and the per-job tokens that guard it.

A job's token is an HMAC of its id under a secret kept in GPUJOBS_HOME, so tokens survive a
supervisor restart without being stored anywhere, and a token for one job is useless for another.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from worker.protocol import REPORT_PATH, InvalidReport, Report

log = logging.getLogger(__name__)

# The handler returns "ok", "stop" (this attempt is no longer wanted) or "unknown".
ReportHandler = Callable[[Report], Awaitable[str]]


class TokenIssuer:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @classmethod
    def from_home(cls, home: Path) -> TokenIssuer:
        """Load the secret from home, creating it (mode 0600) on first use."""
        path = home / "supervisor.secret"
        if not path.exists():
            home.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
        return cls(bytes.fromhex(path.read_text().strip()))

    def token_for(self, job_id: str) -> str:
        return hmac.new(self._secret, job_id.encode(), hashlib.sha256).hexdigest()

    def check(self, job_id: str, token: str) -> bool:
        return hmac.compare_digest(self.token_for(job_id), token)


class ReportServer:
    """aiohttp app on the supervisor's loop; reports go straight to the handler."""

    def __init__(self, issuer: TokenIssuer, handler: ReportHandler) -> None:
        self.issuer = issuer
        self.handler = handler
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.reports_received = 0

    async def start(self, host: str, port: int) -> int:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post(REPORT_PATH.replace("{job_id}", "{job_id}"), self._handle)
        app.router.add_get("/v1/health", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        self.port = sockets[0].getsockname()[1] if sockets else port
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _handle(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not token or not self.issuer.check(job_id, token):
            log.warning("rejected a report for job %s: missing or wrong token", job_id)
            return web.json_response({"ok": False, "error": "invalid token for this job"},
                                     status=401)
        try:
            report = Report.from_json(await request.read())
        except InvalidReport as exc:
            return _reject(job_id, str(exc))
        if report.job_id != job_id:
            return _reject(job_id, f"job id {report.job_id!r} in the body does not match the URL")
        self.reports_received += 1
        outcome = await self.handler(report)
        if outcome == "unknown":
            return web.json_response({"ok": False, "error": "unknown job"}, status=404)
        if outcome == "stop":
            return web.json_response({"ok": True, "stop": True}, status=409)
        return web.json_response({"ok": True})


def _reject(job_id: str, error: str) -> web.Response:
    """Log a report that failed validation and return an HTTP 400 response for it."""
    log.warning("rejected a report for job %s: %s", job_id, error)
    return web.json_response({"ok": False, "error": error}, status=400)
