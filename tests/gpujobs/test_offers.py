"""Offer checks, ranking with reasons, bids, the outbid decision and failed hosts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gpujobs import events as ev
from gpujobs.cli_offers import offer_listing, offers
from gpujobs.emulator import Emulator
from gpujobs.jobs import open_journal
from gpujobs.offers import (
    bid_for, failed_hosts_from_rows, load_failed_hosts, outbid_action, rank_offers,
)
from gpujobs.profiles import Profile
from gpujobs.settings import load_settings
from gpujobs.vast.records import Instance, Offer

PROFILE = Profile("p", ("RTX 4090",), 1, 0.30, 0.95, 2.0)
BID = Profile("b", ("RTX 4090",), 1, 0.20, 0.90, 2.0, interruptible=True, bid_margin=0.10,
              on_preemption="rebid")


def offer(offer_id: int, **fields: Any) -> Offer:
    row = {"id": offer_id, "host_id": offer_id * 10, "machine_id": offer_id * 100,
           "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.20, "min_bid": 0.10,
           "reliability": 0.99, "dlperf": 20.0}
    row.update(fields)
    return Offer.from_api(row)


def instance(min_bid: float | None) -> Instance:
    return Instance.from_api({"id": 5, "min_bid": min_bid, "is_bid": True,
                              "cur_state": "stopped", "intended_status": "stopped",
                              "next_state": "stopped"})


def test_rejections_name_the_reason() -> None:
    candidates = [
        offer(1, gpu_name="RTX 3090"), offer(2, num_gpus=2), offer(3, dph_total=0.31),
        offer(4, reliability=0.9), offer(5), offer(6), offer(7, dph_total=None),
    ]
    ranked, rejected = rank_offers(candidates, PROFILE, excluded_hosts={50: "job x: preempted"},
                                   taken_offer_ids=[6])
    assert [r.offer.id for r in ranked] == []
    assert {r.offer.id: r.reason for r in rejected} == {
        1: "gpu 'RTX 3090' is not RTX 4090",
        2: "2 GPUs, profile needs 1",
        3: "price $0.310/h is above max_dph $0.300/h",
        4: "reliability 0.9 is below 0.95",
        5: "host 50 failed before: job x: preempted",
        6: "already taken by another job",
        7: "price unknown is above max_dph $0.300/h",
    }


def test_rank_by_dlperf_per_dollar_and_reliability() -> None:
    cheap_slow = offer(1, dph_total=0.10, dlperf=5.0)  # 50 dlperf/$
    fast = offer(2, dph_total=0.25, dlperf=25.0)  # 100 dlperf/$
    flaky_fast = offer(3, dph_total=0.25, dlperf=25.0, reliability=0.95)  # 95
    unknown = offer(4, dph_total=0.05, dlperf=None)
    ranked, _ = rank_offers([unknown, cheap_slow, flaky_fast, fast], PROFILE)
    assert [r.offer.id for r in ranked] == [2, 3, 1, 4]
    assert [r.rank for r in ranked] == [1, 2, 3, 4]
    assert ranked[0].score == pytest.approx(99.0)
    assert ranked[0].reason == ("best value 99.0 (dlperf/$ x reliability): $0.250/h, dlperf 25.0 "
                                "= 100.0 dlperf/$, reliability 0.990")
    assert ranked[1].reason.startswith("value 95.0, behind 99.0: ")
    assert ranked[3].reason == "no dlperf figure, ranked by price: $0.050/h, reliability 0.990"


def test_bid_is_min_bid_plus_margin_capped() -> None:
    assert bid_for(offer(1, min_bid=0.10), BID) == 0.11
    assert bid_for(offer(1, min_bid=0.19), BID) == 0.20
    assert bid_for(offer(1), PROFILE) is None
    ranked, _ = rank_offers([offer(1, min_bid=0.10)], BID)
    assert ranked[0].bid_price == 0.11
    assert ranked[0].price_dph == 0.11
    assert "bid = min_bid $0.100 + 10%, capped at $0.200" in ranked[0].reason


def test_bid_never_rounds_below_min_bid() -> None:
    no_margin = Profile("n", ("RTX 4090",), 1, 0.20, 0.90, 2.0, interruptible=True,
                        bid_margin=0.0, on_preemption="rebid")
    assert bid_for(offer(1, min_bid=0.12344), no_margin) == 0.1235
    assert outbid_action(no_margin, instance(0.12344)) == ("rebid", 0.1235)


def test_bid_leaves_room_for_storage() -> None:
    # dph_total less dph_base is the storage price, paid on top of the bid.
    with_disk = offer(1, min_bid=0.16, dph_base=0.18, dph_total=0.21)
    assert bid_for(with_disk, BID) == 0.17  # the cap is max_dph $0.20 less $0.03 storage
    ranked, _ = rank_offers([with_disk], BID)
    assert ranked[0].bid_price == 0.17
    assert ranked[0].price_dph == pytest.approx(0.20)
    assert "capped at $0.170 + storage $0.030" in ranked[0].reason
    _, rejected = rank_offers([offer(2, min_bid=0.18, dph_base=0.18, dph_total=0.21)], BID)
    assert rejected[0].reason == ("min_bid $0.180/h plus storage $0.030/h is above max_dph "
                                  "$0.200/h; a bid within the cap would lose")
    stored = Instance.from_api({"id": 5, "min_bid": 0.16, "is_bid": True,
                                "storage_total_cost": 0.03, "actual_status": "stopped"})
    assert outbid_action(BID, stored) == ("rebid", 0.17)


def test_min_bid_above_max_dph_is_rejected() -> None:
    ranked, rejected = rank_offers([offer(1, min_bid=0.21, dph_total=0.15),
                                    offer(2, min_bid=0.19)], BID)
    assert [r.offer.id for r in ranked] == [2]
    assert ranked[0].bid_price == 0.20
    assert [(r.offer.id, r.reason) for r in rejected] == [
        (1, "min_bid $0.210/h is above max_dph $0.200/h; a bid within the cap would lose"),
    ]
    assert bid_for(offer(1, min_bid=0.21), BID) is None


@pytest.mark.parametrize("profile, min_bid, expected", [
    (BID, 0.10, ("rebid", 0.11)),
    (BID, 0.19, ("rebid", 0.20)),  # the margin is cut at max_dph
    (BID, 0.21, ("migrate", None)),  # even max_dph cannot win it back
    (BID, None, ("migrate", None)),
    (Profile("m", ("RTX 4090",), 1, 0.2, 0.9, 2.0, interruptible=True), 0.10, ("migrate", None)),
    (PROFILE, 0.10, ("migrate", None)),
])
def test_outbid_action(profile: Profile, min_bid: float | None,
                       expected: tuple[str, float | None]) -> None:
    assert outbid_action(profile, instance(min_bid)) == expected


def test_failed_hosts_from_attempt_rows() -> None:
    rows = [
        {"host_id": 1, "job_id": "a", "attempt": 1, "end_reason": "preempted: outbid"},
        {"host_id": 2, "job_id": "a", "attempt": 2, "end_reason": "loading timed out"},
        {"host_id": 3, "job_id": "b", "attempt": 1,
         "end_reason": "instance 9 is offline before the worker started"},
        {"host_id": 4, "job_id": "b", "attempt": 2, "end_reason": "preempted: worker_error: x"},
        {"host_id": 5, "job_id": "c", "attempt": 1, "end_reason": "job done"},
        {"host_id": None, "job_id": "c", "attempt": 2, "end_reason": "preempted: gone"},
    ]
    assert failed_hosts_from_rows(rows) == {
        1: "job a attempt 1: preempted: outbid",
        2: "job a attempt 2: loading timed out",
        3: "job b attempt 1: instance 9 is offline before the worker started",
    }


async def _journal_with_failure(home: Path) -> None:
    settings = load_settings(home=home)
    store = await open_journal(settings)
    submitted = ev.JobSubmitted("j1", "j", "t", "p", "dev-test", {}, {})
    history = [
        submitted,
        ev.OfferSelected(1, 501, 9, 4242, "RTX 4090", 1, 0.2, 0.99, None),
        ev.InstanceRequested(1, 501, "gpujobs:j1:1"),
        ev.InstanceCreated(1, 77, "gpujobs:j1:1", 0.2),
        ev.InstanceDestroyRequested(1, 77, "preempted: outbid"),
        ev.InstanceDestroyed(1, 77),
    ]
    try:
        await store.append("j1", [e.to_new_event() for e in history], expected_version=0)
    finally:
        await store.close()


async def test_load_failed_hosts_reads_journal(tmp_path: Path) -> None:
    home = tmp_path / "home"
    await _journal_with_failure(home)
    store = await open_journal(load_settings(home=home))
    try:
        assert await load_failed_hosts(store) == {4242: "job j1 attempt 1: preempted: outbid"}
        assert await load_failed_hosts(store, within_s=-10.0) == {}
    finally:
        await store.close()


@pytest.fixture
async def emulator(tmp_path: Path):
    emu = Emulator(seed=5, rate_limits=False, workdir=tmp_path / "emu")
    url = await emu.start()
    yield emu, url
    await emu.stop()


async def test_offer_listing_against_emulator(tmp_path: Path, emulator, monkeypatch) -> None:
    emu, url = emulator
    monkeypatch.setenv("VAST_URL", url)
    monkeypatch.setenv("VAST_API_KEY", emu.api_key)
    listing = await offer_listing(load_settings(home=tmp_path / "home"), "dev-test", limit=50)
    assert listing["fitting"] > 0
    assert listing["searched"] == listing["fitting"] + listing["rejected_total"]
    for row in listing["ranked"]:
        assert row["gpu_name"] == "RTX 4090"
        assert row["price_dph"] <= 0.25
        assert row["reliability"] >= 0.90
    scores = [row["score"] for row in listing["ranked"] if row["score"] is not None]
    assert scores == sorted(scores, reverse=True)
    assert all(row["reason"] for row in listing["rejected"])
    assert any("above max_dph" in row["reason"] for row in listing["rejected"])


async def test_offers_command_json_and_table(tmp_path: Path, emulator, monkeypatch) -> None:
    emu, url = emulator
    monkeypatch.setenv("VAST_URL", url)
    monkeypatch.setenv("VAST_API_KEY", emu.api_key)
    monkeypatch.setenv("COLUMNS", "250")
    import typer

    app = typer.Typer()
    app.command()(offers)
    runner = CliRunner()
    # The command runs its own event loop, so it runs in a thread while the emulator serves.
    result = await asyncio.to_thread(
        runner.invoke, app, ["--profile", "dev-test", "--json", "--limit", "3"]
    )
    assert result.exit_code == 0, result.output
    listing = json.loads(result.output)
    assert len(listing["ranked"]) == 3
    assert listing["profile"]["name"] == "dev-test"
    table = await asyncio.to_thread(runner.invoke, app, ["--profile", "dev-test"])
    assert table.exit_code == 0, table.output
    assert "fit profile dev-test" in table.output
    assert "rejected" in table.output
