"""The supervisor's table of instances between ticks: packed as plain tuples, read back whole."""

from __future__ import annotations

import gc

import pytest

from gpujobs.supervisor.instance_table import InstanceTable, pack, slim, unpack
from gpujobs.vast.records import Instance

API_ROW = {
    "id": 41, "label": "gpujobs:job-1:2", "actual_status": "running",
    "intended_status": "running", "cur_state": "running", "next_state": "running",
    "status_msg": "started", "machine_id": 7, "host_id": 9, "gpu_name": "RTX 4090",
    "num_gpus": 1, "dph_total": 0.42, "min_bid": 0.2, "is_bid": True, "start_date": 1.7e9,
    "public_ipaddr": "10.0.0.5", "ports": {"22/tcp": [{"HostPort": "2222"}]},
    "ssh_host": "ssh.example", "ssh_port": 2222, "extra_env": [["GPUJOBS_JOB_ID", "job-1"]],
    "storage_total_cost": 0.01, "storage_cost": 0.1, "disk_space": 32.0, "cuda_max_good": 12.4,
}


def test_round_trip_keeps_read_fields() -> None:
    instance = Instance.from_api(API_ROW)
    back = unpack(pack(instance))

    assert back == Instance.from_api({**API_ROW, "ports": None, "extra_env": None})
    assert back.ports == {}
    assert back.extra_env == {}
    assert back.raw == {"storage_total_cost": 0.01, "storage_cost": 0.1, "disk_space": 32.0}
    assert back.is_bid is True
    assert back.ssh_port == 2222


def test_absent_raw_fields_stay_absent() -> None:
    row = {key: value for key, value in API_ROW.items() if key != "storage_total_cost"}

    back = unpack(pack(Instance.from_api(row)))

    assert "storage_total_cost" not in back.raw
    assert back.raw["disk_space"] == 32.0


def test_packed_instances_leave_collector() -> None:
    table = InstanceTable()
    table[("job-1", 2)] = Instance.from_api(API_ROW)
    gc.collect()

    packed = dict.__getitem__(table, ("job-1", 2))
    assert type(packed) is tuple
    assert not gc.is_tracked(packed)


def test_table_reads_return_instances() -> None:
    table = InstanceTable()
    first = Instance.from_api(API_ROW)
    second = Instance.from_api({**API_ROW, "id": 42, "label": "gpujobs:job-2:1"})
    table[("job-1", 2)] = first
    table[("job-2", 1)] = second

    assert ("job-1", 2) in table
    assert len(table) == 2
    assert table[("job-1", 2)].id == 41
    assert table.get(("job-2", 1)).id == 42
    assert table.get(("job-3", 1)) is None
    assert [key for key, _ in table.items()] == [("job-1", 2), ("job-2", 1)]
    assert [instance.id for instance in table.values()] == [41, 42]
    assert table.pop(("job-1", 2)).id == 41
    assert table.pop(("job-1", 2), None) is None
    with pytest.raises(KeyError):
        table.pop(("job-1", 2))
    with pytest.raises(KeyError):
        table[("job-1", 2)]


@pytest.mark.parametrize("method", ["update", "setdefault", "copy"])
def test_copying_methods_raise(method: str) -> None:
    table = InstanceTable()
    args = {"update": ({},), "setdefault": (("job-1", 1), None), "copy": ()}[method]

    with pytest.raises(TypeError, match=f"InstanceTable.{method} is not supported"):
        getattr(table, method)(*args)


def test_slim_drops_unread_fields() -> None:
    instance = Instance.from_api(API_ROW)

    slimmed = slim(instance)

    assert slimmed == unpack(pack(instance))
    assert slimmed.ports == {}
    assert slimmed.extra_env == {}
    assert "cuda_max_good" not in slimmed.raw
    assert instance.ports != {}
