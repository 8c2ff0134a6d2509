"""Offer and Instance records tolerate the API's type and shape drift."""

import pytest

from gpujobs.vast import Instance, Offer


def test_offer_numeric_strings_and_nulls():
    offer = Offer.from_api({
        "id": "123", "machine_id": 9, "host_id": None, "gpu_name": "RTX 4090 ",
        "num_gpus": "1", "gpu_ram": "24564", "dph_total": "0.21", "dph_base": 0.2,
        "min_bid": None, "reliability2": 0.97, "cuda_max_good": "12.8", "verified": "true",
        "disk_space": 512, "storage_cost": "0.1", "brand_new_key": [1, 2],
    })
    assert offer.id == 123
    assert offer.host_id is None
    assert offer.gpu_name == "RTX 4090"
    assert offer.num_gpus == 1
    assert offer.gpu_ram_mb == 24564.0
    assert offer.dph_total == pytest.approx(0.21)
    assert offer.min_bid is None
    assert offer.reliability == pytest.approx(0.97)
    assert offer.cuda_max_good == pytest.approx(12.8)
    assert offer.verified is True
    assert offer.disk_space_gb == 512.0
    assert offer.raw["brand_new_key"] == [1, 2]


def test_offer_verification_fallback_and_garbage():
    offer = Offer.from_api({"id": 5, "verification": "verified", "dph_total": "n/a",
                            "num_gpus": True})
    assert offer.verified is True
    assert offer.dph_total is None
    assert offer.num_gpus is None


def test_offer_without_id_raises():
    with pytest.raises(ValueError, match="no usable id"):
        Offer.from_api({"gpu_name": "H200"})


def test_instance_drift():
    inst = Instance.from_api({
        "id": 77, "label": None, "actual_status": "running", "intended_status": "running",
        "cur_state": "running", "next_state": "running", "status_msg": "",
        "public_ipaddr": "203.0.113.7 \n", "is_bid": 0, "start_date": "1700000000.5",
        "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41022"}], "8080/tcp": None,
                  "9000/tcp": {"HostIp": "0.0.0.0", "HostPort": "49000"}},
        "extra_env": [["FOO", "bar"], ["EMPTY", None], ["broken"]],
        "ssh_host": "ssh4.example.invalid", "ssh_port": "12345", "mystery": {"a": 1},
    })
    assert inst.public_ipaddr == "203.0.113.7"
    assert inst.ports == {"22/tcp": 41022, "9000/tcp": 49000}
    assert inst.extra_env == {"FOO": "bar", "EMPTY": ""}
    assert inst.status_msg is None
    assert inst.is_bid is False
    assert inst.start_date == pytest.approx(1700000000.5)
    assert inst.ssh_port == 12345
    assert inst.raw["mystery"] == {"a": 1}
    assert inst.ssh_address == ("203.0.113.7", 41022)
    assert inst.is_outbid is False


def test_instance_outbid_triple():
    row = {"id": 1, "cur_state": "stopped", "intended_status": "stopped",
           "next_state": "stopped", "actual_status": "stopped", "is_bid": True}
    assert Instance.from_api(row).is_outbid is True
    assert Instance.from_api({**row, "next_state": "running"}).is_outbid is False


def test_instance_gateway_address_without_ports():
    inst = Instance.from_api({"id": 2, "ssh_host": "ssh1.example.invalid", "ssh_port": 2200,
                              "ports": None, "extra_env": None})
    assert inst.ssh_address == ("ssh1.example.invalid", 2200)
    assert inst.ports == {}
    assert inst.extra_env == {}


def test_instance_without_id_raises():
    with pytest.raises(ValueError, match="no usable id"):
        Instance.from_api({"id": None})
