"""One settings object: defaults, then config files, then environment, then flags."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from gpujobs.errors import ConfigError

SHIPPED_CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
USER_CONFIG_DIR = Path(os.path.expanduser("~/.config/gpujobs"))
DEFAULT_HOME = Path(os.path.expanduser("~/.gpujobs"))


@dataclass(frozen=True)
class Settings:
    home: Path
    vast_url: str | None = None  # None: the client's default, https://console.vast.ai
    vast_api_key: str | None = field(default=None, repr=False)
    artifact_uri: str | None = None  # None: file://<home>/artifacts
    config_dirs: tuple[Path, ...] = (SHIPPED_CONFIG_DIR,)
    env: str | None = None  # configuration environment (dev, prod, ...) from GPUJOBS_ENV
    tick_s: float = 5.0
    heartbeat_timeout_s: float = 60.0  # silence after which a worker counts as unreachable
    unreachable_grace_s: float = 120.0  # further silence before the attempt is given up
    stall_timeout_s: float = 1800.0  # heartbeats without progress for this long: hung
    # Time a running instance's worker has to send its first report. Generous, because a first
    # start may download a dataset or compile kernels before the worker reports.
    first_report_timeout_s: float = 900.0
    report_host: str = "127.0.0.1"
    report_port: int = 0  # 0 picks a free port
    public_report_url: str | None = None  # what workers use to reach the report endpoint
    report_mode: str = "http"  # "mailbox": workers leave reports in the artifact store
    lease_ttl_s: float = 30.0
    sweep_pages_per_tick: int = 4  # pages of the full instance list fetched per tick
    offer_search_limit: int = 64  # offers asked for per profile per tick
    cost_interval_s: float = 60.0
    # Jobs stepped only for their bill at cost_interval_s: at most this many per second on
    # average, those billed longest ago first. With more live instances than cost_interval_s
    # times this (1,200), each is billed less often: every 500 s at 10,000. A job stepped for
    # another reason is billed too if due. Bills at a change of rate or a destroy are never
    # held back, and budgets count the unbilled time of live instances.
    periodic_bills_per_s: float = 20.0
    # Settling a destroyed instance's cost against the provider's charges: wait this long after
    # the destroy, query at most this often, and give up on an instance after the window.
    settle_delay_s: float = 300.0
    settle_interval_s: float = 60.0
    settle_window_s: float = 2 * 86400.0

    @property
    def journal_path(self) -> Path:
        return self.home / "journal.db"

    @property
    def artifact_root(self) -> str:
        return self.artifact_uri or (self.home / "artifacts").resolve().as_uri()

    def profile_files(self) -> list[Path]:
        return [d / "gpu_profiles.yaml" for d in self.config_dirs if (d / "gpu_profiles.yaml").exists()]

    def limit_files(self) -> list[Path]:
        return [d / "limits.yaml" for d in self.config_dirs if (d / "limits.yaml").exists()]

    def budget_files(self) -> list[Path]:
        return [d / "budgets.yaml" for d in self.config_dirs if (d / "budgets.yaml").exists()]

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def load_settings(*, home: Path | None = None, config_dir: Path | None = None) -> Settings:
    """Build settings from the environment; flags given here win over it."""
    env_home = os.environ.get("GPUJOBS_HOME")
    resolved_home = home or (Path(env_home) if env_home else DEFAULT_HOME)
    dirs = [SHIPPED_CONFIG_DIR]
    if USER_CONFIG_DIR.is_dir():
        dirs.append(USER_CONFIG_DIR)
    env_dir = os.environ.get("GPUJOBS_CONFIG_DIR")
    for extra in (Path(env_dir) if env_dir else None, config_dir):
        if extra is None:
            continue
        if not extra.is_dir():
            raise ConfigError(
                f"config folder {extra} does not exist; create it or fix GPUJOBS_CONFIG_DIR"
            )
        dirs.append(extra)
    return Settings(
        home=resolved_home.expanduser(),
        vast_url=_checked_url("VAST_URL"),
        vast_api_key=_checked_api_key(),
        artifact_uri=_checked_artifact_uri(),
        config_dirs=tuple(dirs),
        env=os.environ.get("GPUJOBS_ENV") or None,
        report_host=os.environ.get("GPUJOBS_REPORT_HOST") or "127.0.0.1",
        report_port=_port_from_env(),
        public_report_url=_checked_url("GPUJOBS_REPORT_URL"),
        report_mode=_report_mode_from_env(),
    )


def url_problem(url: str) -> str | None:
    """Return why `url` is not an http(s) URL with a host, or None when it is one."""
    try:
        parts = urlsplit(url)
        parts.port  # raises ValueError for a port that is not a number in 0-65535
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("http", "https"):
        return "it does not start with http:// or https://"
    if not parts.hostname:
        return "it has no host"
    return None


def api_key_problem(key: str) -> str | None:
    """Return why `key` cannot be sent in an HTTP header, without quoting it, or None."""
    if not key.isascii() or any(c.isspace() or not c.isprintable() for c in key):
        return "it contains a space, newline, control or non-ASCII character"
    return None


def _checked_url(variable: str) -> str | None:
    url = os.environ.get(variable) or None
    problem = None if url is None else url_problem(url)
    if problem is not None:
        raise ConfigError(f"{variable}={url!r} is not a valid URL: {problem}; use "
                          "http://HOST:PORT or https://HOST")
    return url


def _checked_artifact_uri() -> str | None:
    uri = os.environ.get("GPUJOBS_ARTIFACT_URI") or None
    if uri is None:
        return None
    parts = urlsplit(uri)
    if parts.scheme == "file" and parts.netloc in ("", "localhost") and parts.path.startswith("/"):
        return uri
    if parts.scheme == "s3" and parts.netloc:
        return uri
    raise ConfigError(f"GPUJOBS_ARTIFACT_URI={uri!r} is not a storage URI; use "
                      "file:///absolute/path or s3://bucket/prefix")


def _checked_api_key() -> str | None:
    key = os.environ.get("VAST_API_KEY", "").strip() or None
    problem = None if key is None else api_key_problem(key)
    if problem is not None:
        raise ConfigError(f"VAST_API_KEY is invalid: {problem}; set it to the key alone, as "
                          "shown on the Vast.ai account page")
    return key


def _report_mode_from_env() -> str:
    mode = os.environ.get("GPUJOBS_REPORT_MODE", "http").strip().lower() or "http"
    if mode not in ("http", "mailbox"):
        raise ConfigError(f"GPUJOBS_REPORT_MODE={mode!r} is not a report mode; use http or mailbox")
    return mode


def _port_from_env() -> int:
    text = os.environ.get("GPUJOBS_REPORT_PORT", "0")
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigError(f"GPUJOBS_REPORT_PORT={text!r} is not a port; use 0-65535 (0: any)")
    return port
