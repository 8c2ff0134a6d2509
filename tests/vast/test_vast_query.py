"""parse_query and parse_order against the official CLI's documented outputs."""

import json

import pytest

from gpujobs.vast import parse_order, parse_query


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def test_query_reference_example_exact():
    result = parse_query("gpu_name=RTX_4090 num_gpus=1 reliability>0.98")
    assert compact(result) == (
        '{"verified":{"eq":true},"external":{"eq":false},"rentable":{"eq":true},'
        '"rented":{"eq":false},"gpu_name":{"eq":"RTX 4090"},"num_gpus":{"eq":"1"},'
        '"reliability":{"gt":"0.98"}}'
    )


def test_query_in_list_exact():
    result = parse_query("gpu_name in [RTX_4090,H100_SXM]", defaults=False)
    assert compact(result["gpu_name"]) == '{"in":["RTX 4090","H100 SXM"]}'


def test_query_gpu_ram_multiplier_exact():
    assert compact(parse_query("gpu_ram>=24", defaults=False)) == '{"gpu_ram":{"gte":24000.0}}'


def test_order_reference_example():
    assert parse_order("score-,dph_total") == [["score", "desc"], ["dph_total", "asc"]]


def test_order_plus_and_alias():
    assert parse_order("+dph,-reliability") == [["dph_total", "asc"], ["reliability", "desc"]]
    assert parse_order(None) == []
    assert parse_order([("dph_total", "desc")]) == [["dph_total", "desc"]]


@pytest.mark.parametrize("text, expected", [
    ("num_gpus>=2", {"num_gpus": {"gte": "2"}}),
    ("num_gpus >= 2", {"num_gpus": {"gte": "2"}}),
    ("dph<0.5", {"dph_total": {"lt": "0.5"}}),
    ("dph_total<=0.5", {"dph_total": {"lte": "0.5"}}),
    ("num_gpus!=1", {"num_gpus": {"neq": "1"}}),
    ("num_gpus==4", {"num_gpus": {"eq": "4"}}),
    ("num_gpus eq 4", {"num_gpus": {"eq": "4"}}),
    ("num_gpus neq 4", {"num_gpus": {"neq": "4"}}),
    ("num_gpus gt 4", {"num_gpus": {"gt": "4"}}),
    ("num_gpus lte 4", {"num_gpus": {"lte": "4"}}),
    ("num_gpus not eq 4", {"num_gpus": {"neq": "4"}}),
    ("gpu_name notin [RTX_3090,RTX_4090]", {"gpu_name": {"notin": ["RTX 3090", "RTX 4090"]}}),
    ("gpu_name nin [RTX_3090]", {"gpu_name": {"notin": ["RTX 3090"]}}),
    ("gpu_name not in [RTX_3090]", {"gpu_name": {"notin": ["RTX 3090"]}}),
    ("static_ip=true", {"static_ip": {"eq": True}}),
    ("static_ip=False", {"static_ip": {"eq": False}}),
    ("cluster_id=null", {"cluster_id": {"eq": None}}),
    ("cluster_id=None", {"cluster_id": {"eq": None}}),
    ("cpu_ram>64", {"cpu_ram": {"gt": 64000.0}}),
    ("gpu_total_ram>=80", {"gpu_total_ram": {"gte": 80000.0}}),
    ("duration>=3", {"duration": {"gte": 259200.0}}),
    ("driver_version>=535.86.05", {"driver_version": {"gte": 535086005}}),
    ("cuda_vers>=12.1", {"cuda_max_good": {"gte": "12.1"}}),
    ("dlperf_usd>10", {"dlperf_per_dphtotal": {"gt": "10"}}),
    ("flops_usd>10", {"flops_per_dphtotal": {"gt": "10"}}),
    ('geolocation="Oregon,_US"', {"geolocation": {"eq": "Oregon, US"}}),
    ("reliability>0.9 reliability<0.99", {"reliability": {"gt": "0.9", "lt": "0.99"}}),
])
def test_query_clauses(text, expected):
    assert parse_query(text, defaults=False) == expected


def test_query_defaults_first():
    assert list(parse_query("")) == ["verified", "external", "rentable", "rented"]
    assert parse_query(None)["rentable"] == {"eq": True}


def test_query_wildcard_deletes_default():
    for wildcard in ("any", "*", "?"):
        result = parse_query(f"verified={wildcard} rented={wildcard}")
        assert "verified" not in result
        assert "rented" not in result
        assert result["rentable"] == {"eq": True}


def test_query_wildcard_needs_equals():
    with pytest.raises(ValueError, match="wildcard"):
        parse_query("verified!=any")


def test_query_unconsumed_text_raises():
    with pytest.raises(ValueError, match="could not parse"):
        parse_query("num_gpus=1 ;")


def test_query_unknown_operator_raises():
    with pytest.raises(ValueError, match="unknown operator"):
        parse_query("num_gpus=>2")


def test_query_missing_operator_raises():
    with pytest.raises(ValueError, match="unknown operator"):
        parse_query("num_gpus")


def test_query_unknown_field_warns(caplog):
    assert parse_query("colour=red", defaults=False) == {"colour": {"eq": "red"}}
    assert "colour" in caplog.text


def test_query_bad_multiplier_value_raises():
    with pytest.raises(ValueError, match="number"):
        parse_query("gpu_ram>=lots")
