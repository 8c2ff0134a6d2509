"""JSON bodies the emulator sends: instance rows, error bodies, charge records."""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from gpujobs.emulator.instances import EmulatedInstance

# Columns the v1 instance list can filter on; computed ones such as dph_total give a 400.
FILTERABLE_COLUMNS = frozenset({
    "id", "label", "actual_status", "intended_status", "cur_state", "next_state", "gpu_name",
    "verification", "machine_id", "host_id", "is_bid", "num_gpus",
})


def json_response(data: Any, status: int = 200) -> web.Response:
    """Build a JSON response whose Content-Type is exactly ``application/json``.

    The official CLI compares the header with that string, so no charset parameter is added.
    """
    return web.Response(body=json.dumps(data).encode(), status=status,
                        content_type="application/json")


def error_response(status: int, error: str, msg: str, **extra: Any) -> web.Response:
    return json_response({"success": False, "error": error, "msg": msg, **extra}, status)


def instance_row(inst: EmulatedInstance) -> dict[str, Any]:
    """The full row that the per-id and v1 list endpoints return."""
    offer = inst.offer
    now = time.time()
    running = inst.actual_status == "running"
    ssh_port = 20000 + inst.id % 40000
    ports: dict[str, Any] = {}
    if running:
        ports["22/tcp"] = [{"HostIp": "0.0.0.0", "HostPort": str(ssh_port + 1)}]
        for index, option in enumerate(sorted(k for k in inst.env if k.startswith("-p "))):
            container_port = option[3:].split(":")[-1]
            if "/" not in container_port:
                container_port += "/tcp"
            ports[container_port] = [{"HostIp": "0.0.0.0", "HostPort": str(ssh_port + 2 + index)}]
    start_date = inst.start_date or inst.created_at
    return {
        "id": inst.id, "machine_id": offer["machine_id"], "host_id": offer["host_id"],
        "actual_status": inst.actual_status, "intended_status": inst.intended_status,
        "cur_state": inst.cur_state, "next_state": inst.next_state,
        "status_msg": inst.status_msg, "label": inst.label,
        "image_uuid": inst.image, "image_args": list(inst.args or []),
        "image_runtype": inst.runtype or ("args" if inst.args else "ssh ssh_proxy"),
        "onstart": inst.onstart, "template_id": None, "template_hash_id": None,
        "template_name": None, "jupyter_token": None,
        "extra_env": [[k, v] for k, v in inst.env.items() if not k.startswith("-")],
        "ssh_host": f"ssh{inst.id % 9 + 1}.emulator.invalid", "ssh_port": ssh_port,
        "ssh_idx": str(inst.id % 9 + 1),
        # The real API pads this field with whitespace; clients must strip it.
        "public_ipaddr": offer["public_ipaddr"] + "\n",
        "local_ipaddrs": "172.17.0.2 127.0.0.1",
        "ports": ports, "direct_port_start": ssh_port + 1 if running else -1,
        "direct_port_end": ssh_port + 20 if running else -1,
        "start_date": start_date, "end_date": offer.get("end_date"),
        "duration": now - start_date, "uptime_mins": round((now - start_date) / 60.0, 2),
        "dph_base": inst.gpu_dph, "dph_total": inst.dph_total, "min_bid": offer["min_bid"],
        "is_bid": inst.is_bid, "storage_cost": offer["storage_cost"],
        "storage_total_cost": round(inst.disk_dph, 6),
        "search": _price_block(inst), "instance": _price_block(inst),
        "credit_balance": None, "credit_discount": None,
        "num_gpus": offer["num_gpus"], "gpu_name": offer["gpu_name"],
        "gpu_ram": offer["gpu_ram"], "gpu_util": 0.0 if running else None,
        "cpu_cores_effective": offer["cpu_cores_effective"], "cpu_ram": offer["cpu_ram"],
        "disk_space": inst.disk_gb, "disk_usage": -1, "disk_util": -1,
        "inet_up": offer["inet_up"], "inet_down": offer["inet_down"],
        "cuda_max_good": str(offer["cuda_max_good"]),
        "driver_version": offer["driver_version"], "reliability2": offer["reliability"],
        "verification": offer["verification"], "geolocation": offer["geolocation"],
        "volume_info": [],
    }


def _price_block(inst: EmulatedInstance) -> dict[str, float]:
    return {"gpuCostPerHour": inst.gpu_dph, "diskHour": round(inst.disk_dph, 6),
            "totalHour": inst.dph_total, "discountTotalHour": 0.0,
            "discountedTotalPerHour": inst.dph_total}


def charge_record(inst: EmulatedInstance) -> dict[str, Any]:
    """Build one charge per instance over its whole life, split into gpu and disk items."""
    gpu_usd, disk_usd = inst.meter.totals()
    end = inst.destroyed_at or time.time()
    gpu_hours = inst.meter.gpu_billed_s / 3600.0
    return {
        "start": inst.created_at, "end": end, "type": "instance",
        "source": f"instance-{inst.id}",
        "description": f"Instance {inst.id} ({inst.offer['num_gpus']}x {inst.offer['gpu_name']})",
        "amount": round(gpu_usd + disk_usd, 6),
        "metadata": {"label": inst.label, "instance_id": inst.id,
                     "machine_id": inst.offer["machine_id"]},
        "items": [
            {"type": "gpu", "amount": round(gpu_usd, 6),
             "description": f"{gpu_hours:.3f} hours at ${inst.gpu_dph:.3f}/hour"},
            {"type": "disk", "amount": round(disk_usd, 6),
             "description": f"{inst.disk_gb:g} GB at ${inst.offer['storage_cost']}/GB/month"},
        ],
    }
