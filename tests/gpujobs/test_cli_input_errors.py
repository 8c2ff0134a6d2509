"""Bad input to the CLI: one-line errors naming the value and the fix, never a traceback."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gpujobs.emulator import Emulator
from gpujobs.jobs import open_journal
from gpujobs.settings import load_settings
from gpujobs.vast.client import VastClient
from gpujobs.vast.errors import VastError
from tests.gpujobs.test_cli_errors import assert_one_line_error, run
from tests.journal.journal_testkit import can_mount_read_only

NOT_UTF8 = b"name: caf\xe9\nprofile: dev-test\n"
ENDLESS_QUERY = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                 "SELECT count(*) FROM c")


@pytest.fixture
def home_with_job(tmp_path: Path) -> Path:
    done = run(["submit", "--profile", "dev-test"], tmp_path)
    assert done.returncode == 0, done.stderr
    return tmp_path


def test_spec_not_utf8(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_bytes(NOT_UTF8)
    done = run(["submit", str(spec)], tmp_path)
    assert_one_line_error(done, str(spec), "not UTF-8", "byte 0xe9 at offset 9", "save the file")


def test_profiles_file_not_utf8(tmp_path: Path) -> None:
    profiles = tmp_path / "gpu_profiles.yaml"
    profiles.write_bytes(NOT_UTF8)
    done = run(["profiles", "validate", str(profiles)], tmp_path)
    assert_one_line_error(done, str(profiles), "not UTF-8")


def test_fault_plan_not_utf8(tmp_path: Path) -> None:
    plan = tmp_path / "faults.yaml"
    plan.write_bytes(b"rules: [\xff]\n")
    done = run(["emulator", "--faults", str(plan)], tmp_path)
    assert_one_line_error(done, f"fault plan {plan} is not UTF-8", "byte 0xff", "save it as UTF-8")


@pytest.mark.parametrize(("option", "value"), [("--time-scale", "0"), ("--time-scale", "nan"),
                                               ("--loading-s", "-1")])
def test_emulator_rejects_bad_timing(tmp_path: Path, option: str, value: str) -> None:
    done = run(["emulator", option, value], tmp_path)
    assert_one_line_error(done, f"invalid {option} {value}")


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_emulator_port_out_of_range(tmp_path: Path, port: str) -> None:
    done = run(["emulator", "--port", port], tmp_path)
    assert_one_line_error(done, f"invalid --port {port}", "0 to 65535")


def test_emulator_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run(["emulator", "--port", str(port)], tmp_path)
    assert_one_line_error(done, f"cannot listen on 127.0.0.1:{port}", "pick another --port")


def test_home_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "home").write_text("")
    for args in (["submit", "--profile", "dev-test"], ["status"], ["audit"]):
        done = run(args, tmp_path)
        assert_one_line_error(done, f"GPUJOBS_HOME={tmp_path / 'home'} is a file",
                              "point GPUJOBS_HOME to a folder")


def test_home_under_a_file(tmp_path: Path) -> None:
    base = tmp_path / "file"
    base.write_text("")
    done = run(["submit", "--profile", "dev-test"], base)
    assert_one_line_error(done, "cannot create GPUJOBS_HOME=", "Not a directory",
                          "writable folder")


@pytest.mark.parametrize("command", [["replay", "--job", "x", "--at"], ["audit", "--since"]])
@pytest.mark.parametrize("value", ["nan", "1e400", "99999999999999", "-5", "0001-01-01"])
def test_time_out_of_range(home_with_job: Path, command: list[str], value: str) -> None:
    done = run([*command, value], home_with_job)
    assert_one_line_error(done, f"invalid time {value!r}", "between 1970-01-01 and 9999-12-31")


def test_audit_limit_too_large(home_with_job: Path) -> None:
    done = run(["audit", "--limit", "99999999999999999999999"], home_with_job)
    assert_one_line_error(done, "invalid --limit 99999999999999999999999",
                          "from 1 to 9223372036854775807")


def test_audit_sql_times_out(home_with_job: Path) -> None:
    done = run(["audit", "sql", "--timeout-s", "0.5", ENDLESS_QUERY], home_with_job)
    assert_one_line_error(done, "timed out after 0.5 s", "raise --timeout-s")


def test_audit_sql_row_limit(home_with_job: Path) -> None:
    query = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 5) "
             "SELECT x FROM c")
    done = run(["audit", "sql", "--max-rows", "4", query], home_with_job)
    assert_one_line_error(done, "more than 4 rows", "add a LIMIT clause or raise --max-rows")
    done = run(["audit", "sql", "--max-rows", "5", "--json", query], home_with_job)
    assert done.returncode == 0, done.stderr
    assert '"x": 5' in done.stdout


@pytest.mark.parametrize("flag,value", [("--timeout-s", "nan"), ("--timeout-s", "0"),
                                        ("--max-rows", "0")])
def test_audit_sql_bad_limits(home_with_job: Path, flag: str, value: str) -> None:
    done = run(["audit", "sql", flag, value, "SELECT 1"], home_with_job)
    assert_one_line_error(done, f"invalid {flag}")


@pytest.mark.parametrize("args,message", [
    (["--tick-s", "-1"], "invalid --tick-s -1.0; use a finite number of seconds above 0"),
    (["--tick-s", "0"], "invalid --tick-s 0.0;"),
    (["--tick-s", "nan"], "invalid --tick-s nan;"),
    (["--intent-timeout-s", "nan"], "invalid --intent-timeout-s nan;"),
    (["--settle-delay-s", "inf"], "invalid --settle-delay-s inf; use a finite number, 0 or more"),
    (["--pacing-scale", "-1"], "invalid --pacing-scale -1.0;"),
])
def test_supervise_bad_timing(tmp_path: Path, args: list[str], message: str) -> None:
    done = run(["supervise", *args], tmp_path, VAST_API_KEY="k")
    assert_one_line_error(done, message)


@pytest.mark.parametrize("variable,value,fragment", [
    ("VAST_URL", "ftp://x", "does not start with http:// or https://"),
    ("VAST_URL", "not a url", "does not start with http:// or https://"),
    ("VAST_URL", "http://", "has no host"),
    ("GPUJOBS_REPORT_URL", "not a url", "does not start with http:// or https://"),
])
def test_bad_url_variable(tmp_path: Path, variable: str, value: str, fragment: str) -> None:
    done = run(["supervise"], tmp_path, **{variable: value, "VAST_API_KEY": "k"})
    assert_one_line_error(done, f"{variable}={value!r} is not a valid URL", fragment)


def test_api_key_with_newline_not_printed(tmp_path: Path) -> None:
    done = run(["offers", "--profile", "dev-test"], tmp_path, VAST_API_KEY="secret1\nsecret2")
    assert_one_line_error(done, "VAST_API_KEY is invalid", "newline")
    assert "secret" not in done.stderr
    assert "secret" not in done.stdout


@pytest.mark.parametrize("uri", ["s3://", "s3:/", "ftp://x", "file://host/x", "relative"])
def test_bad_artifact_uri(tmp_path: Path, uri: str) -> None:
    for args in (["logs", "p3-1-33ac09"], ["data", "push", str(tmp_path)]):
        done = run(args, tmp_path, GPUJOBS_ARTIFACT_URI=uri)
        assert_one_line_error(done, f"GPUJOBS_ARTIFACT_URI={uri!r}", "s3://bucket/prefix")


def test_data_push_rejects_link_out_of_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("inside")
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    (data / "sub" / "link").symlink_to(secret)
    done = run(["data", "push", str(data)], tmp_path)
    assert_one_line_error(done, f"symbolic link {data / 'sub' / 'link'} to {secret}",
                          "outside the folder")
    assert not (tmp_path / "home" / "artifacts").exists()


def test_data_push_keeps_link_inside_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("inside")
    (data / "b.txt").symlink_to(data / "a.txt")
    done = run(["data", "push", str(data)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "2 files" in done.stderr


def test_status_leaves_foreign_sqlite_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    conn = sqlite3.connect(home / "journal.db")
    conn.execute("CREATE TABLE foo (x)")
    conn.commit()
    conn.close()
    before = (home / "journal.db").read_bytes()
    for args in (["status"], ["submit", "--profile", "dev-test"]):
        done = run(args, tmp_path)
        assert_one_line_error(done, "not a journal")
    assert (home / "journal.db").read_bytes() == before


def test_status_on_new_home_creates_nothing(tmp_path: Path) -> None:
    done = run(["status", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert not (tmp_path / "home").exists()


def test_status_table_names_missing_journal(tmp_path: Path) -> None:
    done = run(["status"], tmp_path)

    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert done.stderr == (f"no jobs: no journal at {tmp_path / 'home' / 'journal.db'} yet; submit "
                           "a job first, or set GPUJOBS_HOME to the folder that contains "
                           "journal.db\n")
    assert not (tmp_path / "home").exists()


def test_status_of_empty_journal(tmp_path: Path) -> None:
    async def create_journal() -> None:
        store = await open_journal(load_settings(home=tmp_path / "home"))
        await store.close()

    asyncio.run(create_journal())  # as a supervisor leaves it before the first submit

    done = run(["status"], tmp_path, COLUMNS="100")

    assert done.returncode == 0, done.stderr
    assert "job" in done.stdout
    assert "Traceback" not in done.stderr


def test_submit_options_replace_spec_values(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("name: from-file\nprofile: dev-test\nteam: research\ntotal_steps: 50\n")

    done = run(["submit", str(spec), "--name", "other", "--team", "infra", "--total-steps", "70",
                "--json"], tmp_path)
    listed = run(["status", "--json"], tmp_path)

    assert done.returncode == 0, done.stderr
    assert '"job_id": "other-' in done.stdout
    assert listed.returncode == 0, listed.stderr
    assert '"team": "infra"' in listed.stdout
    assert '"total_steps": 70' in listed.stdout
    assert '"project": "default"' in listed.stdout


def test_submit_option_fills_missing_spec_key(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("name: from-file\n")

    done = run(["submit", str(spec), "--profile", "dev-test", "--json"], tmp_path)
    missing = run(["submit", str(spec)], tmp_path)

    assert done.returncode == 0, done.stderr
    assert '"job_id": "from-file-' in done.stdout
    assert_one_line_error(missing, "missing required key 'profile'")


def test_submit_rejects_bad_name_with_spec(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("name: from-file\nprofile: dev-test\n")

    done = run(["submit", str(spec), "--name", "-bad"], tmp_path)

    assert_one_line_error(done, "invalid job name '-bad'")


@pytest.mark.skipif(not can_mount_read_only(), reason="needs unshare for a read-only mount")
def test_readers_work_in_read_only_home(home_with_job: Path) -> None:
    home = home_with_job / "home"
    commands = [["status", "--json"], ["audit", "verify"], ["audit", "--json"],
                ["audit", "sql", "SELECT count(*) AS n FROM events"]]
    gpujobs = " ".join([sys.executable, "-m", "gpujobs.cli"])
    script = f"mount --bind {home} {home} && mount -o remount,bind,ro {home}"
    for args in commands:
        script += f" && {gpujobs} {' '.join(repr(a) for a in args)}"
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                          timeout=120, env=_env(home))
    assert done.returncode == 0, done.stderr
    assert '"state": "queued"' in done.stdout
    assert "ok: 1 events, chain verified" in done.stdout
    assert "readonly" not in done.stderr


def _env(home: Path) -> dict[str, str]:
    return dict(os.environ, GPUJOBS_HOME=str(home),
                PYTHONPATH=str(Path(__file__).resolve().parents[2]))


@pytest.fixture
async def emulator(tmp_path: Path):
    emu = Emulator(seed=5, rate_limits=False, workdir=tmp_path / "emu")
    url = await emu.start()
    yield emu, url
    await emu.stop()


async def test_supervise_rejected_key_exits(tmp_path: Path, emulator) -> None:
    emu, url = emulator
    done = await asyncio.to_thread(run, ["supervise", "--pacing-scale", "0"], tmp_path,
                                   VAST_URL=url, VAST_API_KEY="wrong-key-123")
    assert_one_line_error(done, f"Vast.ai at {url} rejected the API key (HTTP 401)",
                          "set VAST_API_KEY to a valid key")
    assert "wrong-key-123" not in done.stderr


async def test_supervise_report_port_in_use(tmp_path: Path, emulator) -> None:
    emu, url = emulator
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = await asyncio.to_thread(run, ["supervise", "--pacing-scale", "0"], tmp_path,
                                       VAST_URL=url, VAST_API_KEY=emu.api_key,
                                       GPUJOBS_REPORT_PORT=str(port))
    assert_one_line_error(done, "cannot serve worker reports on 127.0.0.1", "in use",
                          "GPUJOBS_REPORT_PORT to a free port")


async def test_supervise_bad_report_host(tmp_path: Path, emulator) -> None:
    emu, url = emulator
    done = await asyncio.to_thread(run, ["supervise", "--pacing-scale", "0"], tmp_path,
                                   VAST_URL=url, VAST_API_KEY=emu.api_key,
                                   GPUJOBS_REPORT_HOST="999.1.1.1")
    assert_one_line_error(done, "GPUJOBS_REPORT_HOST='999.1.1.1' is not a host name or address",
                          "127.0.0.1")


@pytest.mark.parametrize("base_url,api_key,fragment", [
    ("ftp://x", "key", "Vast.ai URL 'ftp://x' is invalid"),
    ("http://127.0.0.1:1", "secret-part\nsecond-part", "the Vast.ai API key is invalid"),
    ("http://127.0.0.1:1", "secret part", "the Vast.ai API key is invalid"),
])
def test_client_rejects_unsendable_settings(base_url: str, api_key: str, fragment: str) -> None:
    with pytest.raises(VastError) as caught:
        VastClient(api_key=api_key, base_url=base_url)
    assert fragment in str(caught.value)
    assert "secret" not in str(caught.value)


def run_as_other_user(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    """Run the CLI as uid 1000 of a new user namespace, where file permissions apply."""
    command = " ".join([sys.executable, "-m", "gpujobs.cli", *args])
    return subprocess.run(["unshare", "--map-user=1000", "--map-group=1000", "sh", "-c", command],
                          capture_output=True, text=True, timeout=60, env=_env(home))


@pytest.mark.skipif(not can_mount_read_only(), reason="needs unshare for a user namespace")
def test_unreadable_home(home_with_job: Path) -> None:
    home = home_with_job / "home"
    home.chmod(0)
    try:
        for args in (["status"], ["audit"], ["audit", "verify"], ["audit", "sql", "'SELECT 1'"]):
            done = run_as_other_user(args, home)
            assert_one_line_error(done, f"cannot read GPUJOBS_HOME={home} (Permission denied)",
                                  "fix its permissions")
    finally:
        home.chmod(0o755)


@pytest.mark.skipif(not can_mount_read_only(), reason="needs unshare for a user namespace")
def test_home_in_unwritable_folder(tmp_path: Path) -> None:
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o555)
    try:
        done = run_as_other_user(["submit", "--profile", "dev-test"], parent / "home")
        assert_one_line_error(done, f"cannot create GPUJOBS_HOME={parent / 'home'}",
                              "Permission denied", "writable folder")
    finally:
        parent.chmod(0o755)


def test_key_file_not_utf8(tmp_path: Path) -> None:
    key_file = tmp_path / "user" / ".config" / "vastai" / "vast_api_key"
    key_file.parent.mkdir(parents=True)
    key_file.write_bytes(b"secret\xff\n")
    done = run(["supervise"], tmp_path, HOME=str(tmp_path / "user"), VAST_API_KEY="")
    assert_one_line_error(done, f"Vast.ai key file {key_file} is not UTF-8 text")
    assert "secret" not in done.stderr
