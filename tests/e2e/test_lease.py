"""One supervisor per journal: real `gpujobs supervise` processes competing for the lease."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import time
from pathlib import Path

import pytest

from gpujobs.emulator import Emulator
from gpujobs.errors import SupervisorRunning
from gpujobs.jobs import open_journal
from gpujobs.settings import load_settings
from gpujobs.supervisor.lease import LeaseLost, SupervisorLease
from tests.e2e import harness
from tests.e2e.scripted_emulator import SEARCH, ScriptedEmulator
from tests.e2e.torture import SupervisorProcess, child_env, run_cli, write_config_dir

pytestmark = pytest.mark.timeout(180)


def read_lease(journal_path: Path) -> tuple[str, int, float] | None:
    """(host, pid, expires_at) of the lease row, or None."""
    conn = sqlite3.connect(journal_path, timeout=30.0)
    try:
        return conn.execute("SELECT host, pid, expires_at FROM supervisor_lease").fetchone()
    except sqlite3.OperationalError:
        return None  # no supervisor created the table yet
    finally:
        conn.close()


def write_lease(journal_path: Path, host: str, pid: int, expires_at: float) -> None:
    conn = sqlite3.connect(journal_path, timeout=30.0, isolation_level=None)
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS supervisor_lease (id INTEGER PRIMARY KEY, "
                     "holder TEXT, host TEXT, pid INTEGER, acquired_at REAL, expires_at REAL)")
        conn.execute("INSERT OR REPLACE INTO supervisor_lease VALUES (1, 'elsewhere', ?, ?, ?, ?)",
                     (host, pid, time.time(), expires_at))
    finally:
        conn.close()


async def wait_for_holder(journal_path: Path, process: SupervisorProcess,
                          timeout_s: float = 30.0) -> tuple[str, int, float]:
    assert process.process is not None
    deadline = time.monotonic() + timeout_s
    while True:
        row = read_lease(journal_path)
        if row is not None and row[1] == process.process.pid:
            return row
        if process.process.returncode is not None:
            raise AssertionError(f"supervisor exited with {process.process.returncode}; "
                                 f"see {process.log_path}")
        if time.monotonic() > deadline:
            raise AssertionError(f"supervisor pid {process.process.pid} never took the lease")
        await asyncio.sleep(0.1)


@pytest.fixture
async def emulator(tmp_path: Path):
    emulator = Emulator(seed=3, workdir=tmp_path / "emulator", rate_limits=False)
    await emulator.start()
    yield emulator
    await emulator.stop()


def supervise_env(tmp_path: Path, emulator: Emulator) -> tuple[dict[str, str], Path]:
    home = tmp_path / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = child_env(home, emulator, write_config_dir(home))
    return env, home / "journal.db"


async def test_second_supervisor_exits_naming_first(tmp_path: Path, emulator: Emulator) -> None:
    env, journal_path = supervise_env(tmp_path, emulator)
    first = SupervisorProcess(env, tick_s=0.2, log_path=tmp_path / "first.log")
    await first.start()
    try:
        host, pid, _ = await wait_for_holder(journal_path, first)
        code, output = await run_cli(env, "supervise", "--tick-s", "0.2", "--pacing-scale", "0")
        assert code != 0
        assert "Traceback" not in output
        lines = output.splitlines()
        assert len(lines) == 1, output
        assert f"another supervisor (pid {pid} on {host}) holds the lease" in lines[0]
        assert str(journal_path) in lines[0]
        assert first.process.returncode is None  # the first one keeps running
        assert read_lease(journal_path)[1] == pid
    finally:
        assert await first.stop() == 0
    assert read_lease(journal_path) is None  # a clean stop releases the lease


async def test_killed_supervisor_lease_is_taken_over(tmp_path: Path, emulator: Emulator) -> None:
    env, journal_path = supervise_env(tmp_path, emulator)
    first = SupervisorProcess(env, tick_s=0.2, log_path=tmp_path / "supervisor.log")
    await first.start()
    _, first_pid, first_expiry = await wait_for_holder(journal_path, first)
    await first.kill()  # SIGKILL: the lease row stays, unexpired, with a dead pid
    assert read_lease(journal_path)[1] == first_pid
    assert first_expiry > time.time()
    await first.start()  # a new process, on the same host
    try:
        _, second_pid, _ = await wait_for_holder(journal_path, first)
        assert second_pid != first_pid
    finally:
        assert await first.stop() == 0


async def test_expired_lease_from_other_host_taken(tmp_path: Path, emulator: Emulator) -> None:
    env, journal_path = supervise_env(tmp_path, emulator)
    settings = load_settings(home=journal_path.parent)
    await (await open_journal(settings)).close()
    # A holder on another host cannot be checked by pid, so only the expiry frees its lease.
    write_lease(journal_path, "other-host.example", 1, expires_at=time.time() + 600)
    code, output = await run_cli(env, "supervise", "--tick-s", "0.2", "--pacing-scale", "0")
    assert code != 0
    assert "another supervisor (pid 1 on other-host.example)" in output

    write_lease(journal_path, "other-host.example", 1, expires_at=time.time() - 1)
    process = SupervisorProcess(env, tick_s=0.2, log_path=tmp_path / "supervisor.log")
    await process.start()
    try:
        host, _, _ = await wait_for_holder(journal_path, process)
        assert host == socket.gethostname()
    finally:
        assert await process.stop() == 0


async def test_supervisor_exits_when_lease_lost(tmp_path: Path, emulator: Emulator) -> None:
    env, journal_path = supervise_env(tmp_path, emulator)
    process = SupervisorProcess(env, tick_s=0.2, log_path=tmp_path / "supervisor.log")
    await process.start()
    await wait_for_holder(journal_path, process)
    # Another supervisor took the lease over, as it may once a lease expired.
    write_lease(journal_path, "other-host.example", 1, expires_at=time.time() + 600)
    code = await asyncio.wait_for(process.process.wait(), 30.0)
    assert code != 0
    output = process.log_path.read_text()
    assert "Traceback" not in output
    [error] = [line for line in output.splitlines() if line.startswith("error:")]
    assert "lost its lease" in error
    assert "(pid 1 on other-host.example)" in error
    assert read_lease(journal_path)[0] == "other-host.example"  # the new holder keeps it


async def test_second_supervisor_is_refused(tmp_path: Path) -> None:
    async with harness.live_stack(tmp_path / "home") as stack:
        lease = stack.supervisor.lease
        other = SupervisorLease(stack.settings.journal_path, ttl_s=30.0)
        with pytest.raises(SupervisorRunning) as refused:
            await other.acquire()
        assert refused.value.holder == f"pid {lease.pid} on {lease.host}"
        assert read_lease(stack.settings.journal_path)[1] == lease.pid
        # The refused one took nothing: the holder still renews its lease.
        await lease.renew()
    # Once the holder stopped, the lease is free.
    await other.acquire()
    assert read_lease(stack.settings.journal_path)[1] == other.pid


async def test_lost_lease_stops_before_create(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(harness, "Emulator", ScriptedEmulator)
    async with harness.live_stack(tmp_path / "home", lease_ttl_s=2.0) as stack:
        emulator: ScriptedEmulator = stack.emulator  # type: ignore[assignment]
        # The offer search outlasts the lease, as several paced creates in one tick would.
        emulator.reply_delays_s[SEARCH] = 4.0
        job_id = await stack.submit()
        stack.start_loop()
        await emulator.arrived[SEARCH].wait()
        other = SupervisorLease(stack.settings.journal_path, ttl_s=30.0)
        other.host = "other-host.example"
        while True:  # a second supervisor takes over once the first one's lease expired
            try:
                await other.acquire()
                break
            except SupervisorRunning:
                await asyncio.sleep(0.1)
        with pytest.raises(LeaseLost, match="other-host.example"):
            await stack.loop_task
        assert emulator.ledger() == []
        types = [e.type for e in await stack.supervisor.store.read_stream(job_id)]
        assert "InstanceRequested" not in types
