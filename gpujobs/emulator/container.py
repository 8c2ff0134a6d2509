"""Local processes that stand in for an instance's container.

The emulator pulls no image: the command runs on this machine in its own process group,
with the emulator's Python environment first on PATH in place of the image's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger(__name__)

# Environment variables never passed to a container: the API key and anything that looks secret.
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


def parse_env_option(env: Any) -> dict[str, str]:
    """Accept the create body's ``env`` as a dict or as the CLI's ``-e K=V -p 80:80`` string."""
    if isinstance(env, Mapping):
        return {str(key): "" if value is None else str(value) for key, value in env.items()}
    if not isinstance(env, str):
        return {}
    result: dict[str, str] = {}
    words = shlex.split(env)
    for flag, value in zip(words, words[1:]):
        if flag == "-e" and "=" in value:
            name, _, text = value.partition("=")
            result[name] = text
        elif flag in ("-p", "-v", "-n"):
            result[f"{flag} {value}"] = "1"
        elif flag == "-h":
            result["-h"] = value
    return result


def container_env(instance_id: int, requested: Mapping[str, str]) -> dict[str, str]:
    """Build the process environment: ours minus secrets, the request's, the container label."""
    env = {name: value for name, value in os.environ.items()
           if name != "VAST_API_KEY" and not _SECRET_NAME.search(name)}
    for name, value in requested.items():
        if not name.startswith("-"):  # docker options such as "-p 8080:8080"
            env[name] = value
    env["CONTAINER_ID"] = env["VAST_CONTAINERLABEL"] = f"C.{instance_id}"
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def container_argv(onstart: str | None, args: list[str] | None,
                   runtype: str | None) -> list[str] | None:
    """Return the command line, or None when the instance runs nothing (an idle ssh box).

    With the ``args`` runtype, ``onstart`` overrides the image entrypoint, as the CLI's
    ``--entrypoint`` does; otherwise ``onstart`` is a script for ``/bin/sh -c``.
    """
    if runtype == "args" or (runtype is None and args):
        argv = (shlex.split(onstart) if onstart else []) + [str(arg) for arg in args or []]
        return argv or None
    if onstart:
        return ["/bin/sh", "-c", onstart]
    return None


async def spawn(argv: list[str], env: Mapping[str, str], cwd: Path,
                log_path: Path) -> asyncio.subprocess.Process:
    """Start the command in a new session; stdout and stderr append to ``log_path``."""
    with open(log_path, "ab") as log_file:
        return await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log_file,
            stderr=asyncio.subprocess.STDOUT, env=dict(env), cwd=str(cwd),
            start_new_session=True,
        )


def signal_group(pid: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to the process group led by ``pid``; False when the group is gone."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        logger.warning("no permission to signal process group %d", pid)
        return False
    return True


async def terminate(process: asyncio.subprocess.Process, *, sigterm: bool,
                    grace_s: float) -> int | None:
    """Stop the whole process group: SIGTERM and up to ``grace_s`` seconds, then SIGKILL.

    The grace period lasts until every process of the group is gone, not only the leader: a
    ``/bin/sh -c`` leader dies at once on SIGTERM while the program it started is still saving.
    """
    if sigterm and signal_group(process.pid, signal.SIGTERM):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while loop.time() < deadline and _group_alive(process.pid):
            if process.returncode is None:
                try:
                    await asyncio.wait_for(process.wait(), timeout=0.05)
                except asyncio.TimeoutError:
                    pass
            else:
                await asyncio.sleep(0.05)
    signal_group(process.pid, signal.SIGKILL)
    return await process.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_tail(log_path: Path, lines: int) -> str:
    """Return the last ``lines`` lines of the log, or an empty string before it exists."""
    try:
        data = log_path.read_bytes()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    kept = text.splitlines(keepends=True)[-lines:] if lines > 0 else []
    return "".join(kept)
