"""Offer and instance records built from Vast.ai API rows.

The API drifts: any key may be null or missing, numbers arrive as strings, ``public_ipaddr``
carries trailing whitespace, ``ports`` maps ``"22/tcp"`` to bindings with a string
``HostPort``, and ``extra_env`` is a list of ``[key, value]`` pairs. The `from_api`
constructors accept all of that; the full row stays in ``raw``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

# actual_status values of an instance whose host dropped.
HOST_LOST_STATUSES = frozenset({"offline", "unknown"})


def to_int(value: Any) -> int | None:
    """Return ``value`` as an int, or None when it is null or not a number."""
    number = to_float(value)
    return None if number is None else int(number)


def to_float(value: Any) -> float | None:
    """Return ``value`` as a float, or None when it is null, a bool or not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        return None


def to_bool(value: Any) -> bool | None:
    if value is None:
        return None
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no", ""):
            return False
        return None
    return bool(value)


def to_str(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def parse_ports(value: Any) -> dict[str, int]:
    """Map container ports (``"22/tcp"``) to the first host port bound to each."""
    ports: dict[str, int] = {}
    if not isinstance(value, Mapping):
        return ports
    for container_port, bindings in value.items():
        if isinstance(bindings, Mapping):
            bindings = [bindings]
        for binding in bindings or []:
            host_port = to_int(binding.get("HostPort")) if isinstance(binding, Mapping) else None
            if host_port is not None:
                ports[str(container_port)] = host_port
                break
    return ports


def parse_extra_env(value: Any) -> dict[str, str]:
    """Turn ``[[key, value], ...]`` (or a dict) into a dict of strings."""
    if isinstance(value, Mapping):
        return {str(key): "" if item is None else str(item) for key, item in value.items()}
    env: dict[str, str] = {}
    for pair in value or []:
        if isinstance(pair, (list, tuple)) and len(pair) >= 2:
            env[str(pair[0])] = "" if pair[1] is None else str(pair[1])
    return env


@dataclass(frozen=True)
class Offer:
    """One rentable machine slice from the offer search."""

    id: int
    machine_id: int | None
    host_id: int | None
    gpu_name: str | None
    num_gpus: int | None
    gpu_ram_mb: float | None
    dph_total: float | None
    dph_base: float | None
    min_bid: float | None
    reliability: float | None
    dlperf: float | None
    dlperf_per_dphtotal: float | None
    geolocation: str | None
    cuda_max_good: float | None
    disk_space_gb: float | None
    storage_cost: float | None  # $/GB/month
    inet_down: float | None
    verified: bool | None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def from_api(cls, row: Mapping[str, Any]) -> "Offer":
        """Build an offer from a search row; raises ValueError when the row has no id."""
        offer_id = to_int(row.get("id", row.get("ask_contract_id")))
        if offer_id is None:
            raise ValueError(f"offer row has no usable id: {dict(row)!r:.200}")
        verified = to_bool(row.get("verified"))
        if verified is None and row.get("verification") is not None:
            verified = row.get("verification") == "verified"
        return cls(
            id=offer_id,
            machine_id=to_int(row.get("machine_id")),
            host_id=to_int(row.get("host_id")),
            gpu_name=to_str(row.get("gpu_name")),
            num_gpus=to_int(row.get("num_gpus")),
            gpu_ram_mb=to_float(row.get("gpu_ram")),
            dph_total=to_float(row.get("dph_total")),
            dph_base=to_float(row.get("dph_base")),
            min_bid=to_float(row.get("min_bid")),
            reliability=to_float(row.get("reliability", row.get("reliability2"))),
            dlperf=to_float(row.get("dlperf")),
            dlperf_per_dphtotal=to_float(row.get("dlperf_per_dphtotal")),
            geolocation=to_str(row.get("geolocation")),
            cuda_max_good=to_float(row.get("cuda_max_good")),
            disk_space_gb=to_float(row.get("disk_space")),
            storage_cost=to_float(row.get("storage_cost")),
            inet_down=to_float(row.get("inet_down")),
            verified=verified,
            raw=dict(row),
        )


@dataclass(frozen=True)
class Instance:
    """One rented instance as the instance endpoints return it."""

    id: int
    label: str | None
    actual_status: str | None
    intended_status: str | None
    cur_state: str | None
    next_state: str | None
    status_msg: str | None
    machine_id: int | None
    host_id: int | None
    gpu_name: str | None
    num_gpus: int | None
    dph_total: float | None
    min_bid: float | None
    is_bid: bool | None
    start_date: float | None  # epoch seconds
    public_ipaddr: str | None
    ports: Mapping[str, int] = field(default_factory=dict, hash=False)
    ssh_host: str | None = None
    ssh_port: int | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict, hash=False, repr=False)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def from_api(cls, row: Mapping[str, Any]) -> "Instance":
        """Build an instance from an API row; raises ValueError when the row has no id."""
        instance_id = to_int(row.get("id"))
        if instance_id is None:
            raise ValueError(f"instance row has no usable id: {dict(row)!r:.200}")
        label = row.get("label")
        return cls(
            id=instance_id,
            label=None if label is None else str(label),
            actual_status=to_str(row.get("actual_status")),
            intended_status=to_str(row.get("intended_status")),
            cur_state=to_str(row.get("cur_state")),
            next_state=to_str(row.get("next_state")),
            status_msg=to_str(row.get("status_msg")),
            machine_id=to_int(row.get("machine_id")),
            host_id=to_int(row.get("host_id")),
            gpu_name=to_str(row.get("gpu_name")),
            num_gpus=to_int(row.get("num_gpus")),
            dph_total=to_float(row.get("dph_total")),
            min_bid=to_float(row.get("min_bid")),
            is_bid=to_bool(row.get("is_bid")),
            start_date=to_float(row.get("start_date")),
            public_ipaddr=to_str(row.get("public_ipaddr")),
            ports=parse_ports(row.get("ports")),
            ssh_host=to_str(row.get("ssh_host")),
            ssh_port=to_int(row.get("ssh_port")),
            extra_env=parse_extra_env(row.get("extra_env")),
            raw=dict(row),
        )

    @property
    def is_outbid(self) -> bool:
        """Whether the instance shows the interruption triple (cur, intended and next stopped).

        An outbid interruptible instance reads this way, and so does one the user stopped.
        """
        return self.cur_state == self.intended_status == self.next_state == "stopped"

    @property
    def host_lost(self) -> bool:
        """Whether the host dropped: "offline" (disconnected) or "unknown" (no heartbeat).

        Vast.ai documents that either status can recover later.
        """
        return self.actual_status in HOST_LOST_STATUSES

    @property
    def ssh_address(self) -> tuple[str, int] | None:
        """The (host, port) to reach sshd: the direct port when mapped, else the ssh gateway."""
        direct_port = self.ports.get("22/tcp")
        if direct_port is not None and self.public_ipaddr:
            return self.public_ipaddr, direct_port
        if self.ssh_host and self.ssh_port is not None:
            return self.ssh_host, self.ssh_port
        return None
