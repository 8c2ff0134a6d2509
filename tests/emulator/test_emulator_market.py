"""The seeded market: guaranteed offers, determinism, filter operators, ordering, renting."""

from __future__ import annotations

import pytest

from gpujobs.emulator.errors import QueryError
from gpujobs.emulator.market import Market
from gpujobs.vast import parse_query


def search(market: Market, text: str, **control):
    return market.search({**parse_query(text), "allocated_storage": 10.0, **control})


@pytest.mark.parametrize("seed", [0, 1, 42, 9999])
def test_guaranteed_offers(seed):
    market = Market(seed)
    cheap_4090 = search(market, "gpu_name=RTX_4090 num_gpus=1 dph<=0.25 reliability>=0.90")
    assert len(cheap_4090) >= 8
    a100 = search(market, "gpu_name in [A100_SXM4,A100_PCIE] num_gpus=1 dph<=2 reliability>=0.98")
    assert len(a100) >= 2
    h100 = search(market, "gpu_name=H100_SXM num_gpus=4 dph<=4 reliability>=0.99")
    assert len(h100) >= 1


def test_market_deterministic_per_seed():
    assert Market(5).offers.keys() == Market(5).offers.keys()
    assert Market(5).offers.keys() != Market(6).offers.keys()


def test_offer_shape():
    offer = search(Market(0), "gpu_name=RTX_4090", limit=1)[0]
    assert offer["gpu_name"] == "RTX 4090"
    assert offer["min_bid"] < offer["dph_total"]
    assert 0.85 <= offer["reliability"] <= 0.999
    assert offer["geolocation"].split(", ")[-1].isupper()
    assert offer["ask_contract_id"] == offer["id"]
    assert offer["search"]["totalHour"] == offer["dph_total"]


def test_hosts_have_several_machines():
    market = Market(3)
    machines_per_host: dict[int, set] = {}
    for offer in market.offers.values():
        machines_per_host.setdefault(offer["host_id"], set()).add(offer["machine_id"])
    assert max(len(machines) for machines in machines_per_host.values()) >= 2


def test_gpu_names_include_spaced_models():
    names = {offer["gpu_name"] for offer in Market(0).offers.values()}
    assert {"RTX 4090", "A100 SXM4", "A100 PCIE", "H100 SXM", "RTX 3090", "L40S",
            "H200"} <= names


def test_offers_per_gpu_scales_market():
    assert len(Market(0, offers_per_gpu=20).offers) > len(Market(0, offers_per_gpu=1).offers)


def test_numeric_string_coercion():
    market = Market(0)
    as_string = market.search(parse_query("num_gpus>=4", defaults=False))
    as_number = market.search({"num_gpus": {"gte": 4}})
    assert as_string
    assert [o["id"] for o in as_string] == [o["id"] for o in as_number]
    assert all(offer["num_gpus"] >= 4 for offer in as_string)


@pytest.mark.parametrize("condition, check", [
    ({"eq": "RTX 3090"}, lambda name: name == "RTX 3090"),
    ({"neq": "RTX 3090"}, lambda name: name != "RTX 3090"),
    ({"in": ["H200", "L40S"]}, lambda name: name in ("H200", "L40S")),
    ({"notin": ["H200", "L40S"]}, lambda name: name not in ("H200", "L40S")),
])
def test_string_operators(condition, check):
    rows = Market(0).search({"gpu_name": condition})
    assert rows
    assert all(check(row["gpu_name"]) for row in rows)


def test_range_operators_and_bool():
    rows = Market(0).search({"dph_total": {"gt": "0.5", "lte": "2"}, "verified": {"eq": "true"}})
    assert rows
    assert all(0.5 < row["dph_total"] <= 2 and row["verified"] is True for row in rows)
    unverified = Market(0).search({"verified": {"eq": False}})
    assert unverified
    assert all(row["verified"] is False for row in unverified)


def test_order_and_limit():
    rows = Market(0).search({"order": [["dph_total", "desc"]], "limit": 5})
    assert len(rows) == 5
    prices = [row["dph_total"] for row in rows]
    assert prices == sorted(prices, reverse=True)
    default = Market(0).search({})
    scores = [row["score"] for row in default]
    assert scores == sorted(scores, reverse=True)


def test_offer_types():
    market = Market(0)
    on_demand = market.search({"type": "on-demand"})
    assert [r["id"] for r in market.search({"type": "ondemand"})] == [r["id"] for r in on_demand]
    bids = market.search({"type": "bid"})
    assert bids and all(row["is_bid"] for row in bids)
    assert market.search({"type": "reserved"}) == []


def test_rented_filter_ignored_like_backend():
    market = Market(0)
    assert len(market.search({"rented": {"eq": True}})) == len(market.search({}))


def test_allocated_storage_changes_dph_total():
    market = Market(0)
    small = {r["id"]: r["dph_total"] for r in market.search({"allocated_storage": 5})}
    large = {r["id"]: r["dph_total"] for r in market.search({"allocated_storage": 500})}
    assert all(large[offer_id] > small[offer_id] for offer_id in small)


def test_unknown_operator_rejected():
    with pytest.raises(QueryError, match="unknown operator"):
        Market(0).search({"num_gpus": {"approx": 2}})


def test_offer_rented_once():
    market = Market(0)
    offer_id = next(iter(market.offers))
    assert market.take(offer_id)["id"] == offer_id
    assert market.take(offer_id) is None
    assert offer_id not in [row["id"] for row in market.search({})]
