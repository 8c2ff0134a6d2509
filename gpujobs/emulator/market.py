"""A seeded market of Vast.ai offers with the API's row shape, search and renting.

A new market contains at least ten cheap 1x "RTX 4090" offers (dph_total <= 0.25 for up to
144 GB of allocated storage, reliability >= 0.90), five 1x A100 offers under $2/h with
reliability >= 0.98, and three 4x "H100 SXM" offers under $4/h with reliability >= 0.99, all
verified. Random offers follow. A destroyed instance's machine comes back under a new offer id.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Mapping

from gpujobs.emulator.filters import check_filters, compile_filters, parse_order, sort_rows

CONTROL_KEYS = frozenset({
    "order", "type", "limit", "allocated_storage", "target_reliability", "extra_ids",
    "template_id", "disable_bundling", "show_incompatible",
})
# The real backend ignores "rented" (the CLI still sends it), and so does the emulator.
# NOTE: without filters the emulator also returns unverified offers; which defaults the real
# backend applies to a bare query is undocumented.
IGNORED_FILTERS = frozenset({"rented"})
DEFAULT_ALLOCATED_STORAGE_GB = 5.0


@dataclass(frozen=True)
class GpuModel:
    name: str
    gpu_ram_mb: int
    dph_per_gpu: tuple[float, float]  # on-demand $/h range for one GPU
    dlperf_per_gpu: float
    tflops_per_gpu: float
    compute_cap: int


GPU_MODELS = (
    GpuModel("RTX 4090", 24564, (0.28, 0.55), 26.0, 82.6, 890),
    GpuModel("RTX 3090", 24576, (0.12, 0.30), 15.5, 35.6, 860),
    GpuModel("RTX A5000", 24564, (0.18, 0.35), 14.0, 27.8, 860),
    GpuModel("L40S", 46068, (0.55, 1.10), 34.0, 91.6, 890),
    GpuModel("A100 PCIE", 40960, (0.70, 1.40), 36.0, 19.5, 800),
    GpuModel("A100 SXM4", 81920, (0.90, 1.80), 42.0, 19.5, 800),
    GpuModel("H100 SXM", 81559, (1.70, 3.20), 80.0, 67.0, 900),
    GpuModel("H200", 143771, (2.60, 4.20), 96.0, 67.0, 900),
)
_MODELS_BY_NAME = {model.name: model for model in GPU_MODELS}
GEOLOCATIONS = ("Oregon, US", "Texas, US", "Virginia, US", "Quebec, CA", "Bavaria, DE",
                "North Holland, NL", "Sweden, SE", "Tokyo, JP", "HK", "New South Wales, AU")


class Market:
    """Offers keyed by id. Renting takes an offer off the market for good."""

    def __init__(self, seed: int = 0, offers_per_gpu: int | None = None):
        self._rng = random.Random(seed)
        self._next_offer_id = 10_000_000 + self._rng.randrange(1_000_000)
        self._next_machine_id = 20_000 + self._rng.randrange(10_000)
        self._next_host_id = 100_000 + self._rng.randrange(100_000)
        self.offers: dict[int, dict[str, Any]] = {}
        self._rented: set[int] = set()  # offers taken off the market by a create
        self._priced_cache: dict[int, dict[float, dict[str, Any]]] = {}  # offer id, storage
        self._last_host_id: int | None = None  # the highest host id so far
        self._seed_guaranteed()
        for model in GPU_MODELS:
            for _ in range(6 if offers_per_gpu is None else offers_per_gpu):
                self._add_random(model)

    # Building ---------------------------------------------------------------------------

    def _seed_guaranteed(self) -> None:
        for _ in range(10):
            self._add(_MODELS_BY_NAME["RTX 4090"], 1, self._rng.uniform(0.14, 0.22),
                      self._rng.uniform(0.92, 0.995), verified=True)
        for name in ("A100 SXM4", "A100 SXM4", "A100 SXM4", "A100 PCIE", "A100 PCIE"):
            self._add(_MODELS_BY_NAME[name], 1, self._rng.uniform(0.85, 1.6),
                      self._rng.uniform(0.985, 0.999), verified=True)
        for _ in range(3):
            self._add(_MODELS_BY_NAME["H100 SXM"], 4, self._rng.uniform(3.2, 3.85),
                      self._rng.uniform(0.992, 0.999), verified=True)

    def _add_random(self, model: GpuModel) -> None:
        num_gpus = self._rng.choice((1, 1, 1, 2, 4, 8))
        dph_base = num_gpus * self._rng.uniform(*model.dph_per_gpu)
        self._add(model, num_gpus, dph_base, self._rng.uniform(0.85, 0.999),
                  verified=self._rng.random() < 0.85)

    def _new_host(self) -> int:
        self._next_host_id += self._rng.randrange(1, 500)
        return self._next_host_id

    def _add(self, model: GpuModel, num_gpus: int, dph_base: float, reliability: float, *,
             verified: bool, host_id: int | None = None, machine_id: int | None = None) -> int:
        """Add an offer; a new machine joins the last host two times in three."""
        if host_id is None:
            last_host = self._last_host_id
            host_id = last_host if last_host and self._rng.random() < 0.66 else self._new_host()
        self._last_host_id = max(self._last_host_id or 0, host_id)
        if machine_id is None:
            self._next_machine_id += self._rng.randrange(1, 40)
            machine_id = self._next_machine_id
        self._next_offer_id += self._rng.randrange(1, 5000)
        offer_id = self._next_offer_id
        self.offers[offer_id] = self._row(offer_id, model, num_gpus, round(dph_base, 4),
                                          round(reliability, 4), verified, host_id, machine_id)
        return offer_id

    def _row(self, offer_id: int, model: GpuModel, num_gpus: int, dph_base: float,
             reliability: float, verified: bool, host_id: int, machine_id: int) -> dict:
        rng = self._rng
        cpu_cores = num_gpus * rng.choice((8, 12, 16, 32))
        dlperf = round(model.dlperf_per_gpu * num_gpus * rng.uniform(0.9, 1.05), 3)
        now = time.time()
        return {
            "id": offer_id, "ask_contract_id": offer_id, "bundle_id": offer_id + 7,
            "machine_id": machine_id, "host_id": host_id, "cluster_id": None,
            "num_gpus": num_gpus, "gpu_name": model.name, "gpu_ram": model.gpu_ram_mb,
            "gpu_total_ram": model.gpu_ram_mb * num_gpus, "gpu_frac": 1.0,
            "gpu_arch": "nvidia", "gpu_mem_bw": round(rng.uniform(800, 3300), 1),
            "compute_cap": model.compute_cap, "cuda_max_good": rng.choice((12.4, 12.6, 12.8)),
            "driver_version": "570.124.06", "driver_vers": 570124006,
            "cpu_cores": cpu_cores, "cpu_cores_effective": float(cpu_cores),
            "cpu_ram": cpu_cores * 4096, "cpu_name": "AMD EPYC 7B13", "cpu_arch": "amd64",
            "disk_space": float(rng.choice((200, 500, 1000, 2000))),
            "disk_bw": round(rng.uniform(1000, 6000), 1), "pci_gen": 4.0,
            "pcie_bw": round(rng.uniform(12, 25), 1), "os_version": "22.04",
            "ubuntu_version": "22.04", "mobo_name": "ROMED8-2T", "bw_nvlink": 0.0,
            "inet_up": round(rng.uniform(200, 5000), 1),
            "inet_down": round(rng.uniform(200, 5000), 1),
            "inet_up_cost": 0.002, "inet_down_cost": 0.002,
            "direct_port_count": rng.choice((0, 20, 100)),
            "public_ipaddr": f"203.0.113.{machine_id % 250 + 1}",
            "static_ip": rng.random() < 0.5,
            "dph_base": dph_base, "min_bid": round(dph_base * rng.uniform(0.35, 0.7), 4),
            "storage_cost": round(rng.uniform(0.05, 0.15), 4),
            "credit_discount_max": 0.0,
            "reliability": reliability, "reliability2": reliability,
            "dlperf": dlperf, "total_flops": round(model.tflops_per_gpu * num_gpus, 2),
            "verification": "verified" if verified else "unverified", "verified": verified,
            "rentable": True, "rented": False, "is_bid": False, "external": False,
            "hosting_type": 1 if rng.random() < 0.3 else 0,
            "duration": float(rng.randrange(7, 180) * 86400),
            "start_date": now - rng.randrange(86400, 90 * 86400),
            "end_date": now + rng.randrange(7, 180) * 86400,
            "geolocation": rng.choice(GEOLOCATIONS), "has_avx": 1, "vms_enabled": False,
            "gpu_display_active": False, "gpu_max_power": 450.0, "gpu_max_temp": 83.0,
        }

    # Reading ----------------------------------------------------------------------------

    @staticmethod
    def priced(offer: Mapping[str, Any], allocated_storage_gb: float) -> dict[str, Any]:
        """Return the offer row with storage-dependent prices filled in."""
        row = dict(offer)
        storage_dph = allocated_storage_gb * row["storage_cost"] / 720.0
        dph_total = round(row["dph_base"] + storage_dph, 6)
        row["dph_total"] = dph_total
        row["discounted_dph_total"] = dph_total
        row["storage_total_cost"] = round(storage_dph, 6)
        row["dlperf_per_dphtotal"] = round(row["dlperf"] / dph_total, 4)
        row["flops_per_dphtotal"] = round(row["total_flops"] / dph_total, 4)
        row["score"] = round(row["dlperf_per_dphtotal"] * row["reliability"], 4)
        row["datacenter"] = row["hosting_type"] == 1
        row["search"] = row["instance"] = {
            "gpuCostPerHour": row["dph_base"], "diskHour": row["storage_total_cost"],
            "totalHour": dph_total, "discountTotalHour": 0.0,
            "discountedTotalPerHour": dph_total,
        }
        return row

    def search(self, query: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Evaluate a search body; raises QueryError on an unknown operator."""
        filters = {key: value for key, value in query.items()
                   if key not in CONTROL_KEYS and key not in IGNORED_FILTERS}
        check_filters(filters)
        offer_type = str(query.get("type") or "on-demand").replace("ondemand", "on-demand")
        if offer_type == "reserved":
            return []
        storage_gb = _float_or(query.get("allocated_storage"), DEFAULT_ALLOCATED_STORAGE_GB)
        rows = [self._priced_row(offer_id, offer, storage_gb)
                for offer_id, offer in self.offers.items()]
        test = compile_filters(filters)
        rows = [row for row in rows if test(row)]
        rows = sort_rows(rows, parse_order(query.get("order") or [["score", "desc"]]))
        limit = query.get("limit")
        if limit is not None:
            rows = rows[: max(0, int(_float_or(limit, len(rows))))]
        # Copies, so that the caller may change them and the cache stays as priced.
        rows = [dict(row) for row in rows]
        if offer_type == "bid":
            for row in rows:
                row["is_bid"] = True
        return rows

    def _priced_row(self, offer_id: int, offer: Mapping[str, Any],
                    storage_gb: float) -> dict[str, Any]:
        """Return the offer priced for `storage_gb`, cached: an offer never changes once listed."""
        by_storage = self._priced_cache.setdefault(offer_id, {})
        row = by_storage.get(storage_gb)
        if row is None:
            row = by_storage[storage_gb] = self.priced(offer, storage_gb)
        return row

    def take(self, offer_id: int) -> dict[str, Any] | None:
        """Remove and return the offer, or None when it is rented or unknown."""
        self._priced_cache.pop(offer_id, None)
        offer = self.offers.pop(offer_id, None)
        if offer is not None:
            self._rented.add(offer_id)
        return offer

    def was_rented(self, offer_id: int) -> bool:
        """Return True when the offer was listed and then rented, by us or by another renter."""
        return offer_id in self._rented

    def relist(self, offer: Mapping[str, Any]) -> int:
        """Put a released machine back on the market under a new offer id."""
        model = _MODELS_BY_NAME.get(offer["gpu_name"]) or GPU_MODELS[0]
        return self._add(model, offer["num_gpus"], offer["dph_base"], offer["reliability"],
                         verified=bool(offer["verified"]), host_id=offer["host_id"],
                         machine_id=offer["machine_id"])

    def gpu_names(self) -> list[str]:
        return sorted({model.name for model in GPU_MODELS})


def _float_or(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default
