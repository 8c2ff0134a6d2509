"""`gpujobs offers --profile P`: the offers a profile would rent, ranked, with the rejected ones."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Optional

import typer
from rich.table import Column, Table

from gpujobs.cli_console import console
from gpujobs.offers import RankedOffer, Rejected, load_failed_hosts, rank_offers
from gpujobs.profiles import Profile, environment_from, get_profile, load_profiles
from gpujobs.settings import Settings, load_settings
from gpujobs.vast.client import VastClient
from gpujobs.vast.query import parse_query


SEARCH_LIMIT = 200


def broad_query(profile: Profile) -> dict[str, Any]:
    """Build a query of the profile's GPU and extra filters only, so local checks name the rest."""
    query = parse_query(profile.extra_filters) if profile.extra_filters else parse_query("")
    names = list(profile.gpu_names)
    query["gpu_name"] = {"eq": names[0]} if len(names) == 1 else {"in": names}
    return query


async def failed_hosts(settings: Settings) -> dict[int, str]:
    """Hosts that failed jobs recently, from the journal if there is one."""
    from gpujobs.jobs import journal_exists, open_journal

    if not journal_exists(settings):
        return {}
    store = await open_journal(settings, read_only=True)
    try:
        return await load_failed_hosts(store)
    finally:
        await store.close()


async def offer_listing(settings: Settings, profile_name: str, *, env: str | None = None,
                        limit: int = 10) -> dict[str, Any]:
    """Search, check and rank offers for a profile; returns the JSON form `offers` prints."""
    profiles = load_profiles(settings.profile_files(), env=environment_from(env))
    profile = get_profile(profiles, profile_name)
    async with VastClient(api_key=settings.vast_api_key, base_url=settings.vast_url) as client:
        offers = await client.search_offers(
            broad_query(profile), order=[("dph_total", "asc")], limit=SEARCH_LIMIT,
            offer_type="bid" if profile.interruptible else "on-demand",
            allocated_storage_gb=profile.disk_gb,
        )
    ranked, rejected = rank_offers(offers, profile, excluded_hosts=await failed_hosts(settings))
    return {
        "profile": profile.to_dict(),
        "searched": len(offers),
        "ranked": [_ranked_row(r) for r in ranked[:limit]],
        "fitting": len(ranked),
        "rejected": [_rejected_row(r) for r in rejected[:limit]],
        "rejected_total": len(rejected),
    }


def _ranked_row(item: RankedOffer) -> dict[str, Any]:
    offer = item.offer
    return {
        "rank": item.rank, "offer_id": offer.id, "host_id": offer.host_id,
        "machine_id": offer.machine_id, "gpu_name": offer.gpu_name, "num_gpus": offer.num_gpus,
        "price_dph": item.price_dph, "bid_price": item.bid_price, "dph_total": offer.dph_total,
        "dlperf": offer.dlperf, "reliability": offer.reliability,
        "score": None if item.score is None else round(item.score, 3), "reason": item.reason,
    }


def _rejected_row(item: Rejected) -> dict[str, Any]:
    offer = item.offer
    return {"offer_id": offer.id, "host_id": offer.host_id, "gpu_name": offer.gpu_name,
            "num_gpus": offer.num_gpus, "dph_total": offer.dph_total,
            "reliability": offer.reliability, "reason": item.reason}


def offers(
    profile: str = typer.Option(..., "--profile", help="GPU profile to search for."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object."),
    limit: int = typer.Option(10, "--limit", min=1, help="Rows to show of each list."),
    env: Optional[str] = typer.Option(None, "--env", help="Environment (default GPUJOBS_ENV)."),
) -> None:
    """Show the offers a profile would rent, best first, and why others were rejected."""
    listing = asyncio.run(offer_listing(load_settings(), profile, env=env, limit=limit))
    if json_output:
        typer.echo(json.dumps(listing, indent=2))
        return
    print_listing(listing)


def print_listing(listing: dict[str, Any]) -> None:
    table = Table("#", Column("offer", no_wrap=True), Column("host", no_wrap=True), "gpu",
                  "$/h", "dlperf", "reliability", "value", Column("why", ratio=1),
                  title=f"{listing['fitting']} of {listing['searched']} offers fit profile "
                        f"{listing['profile']['name']}")
    for row in listing["ranked"]:
        table.add_row(str(row["rank"]), str(row["offer_id"]), str(row["host_id"]),
                      f"{row['num_gpus']}x {row['gpu_name']}", f"{row['price_dph']:.3f}",
                      _num(row["dlperf"]), _num(row["reliability"], 3), _num(row["score"]),
                      row["reason"])
    console().print(table)
    rejected = Table(Column("offer", no_wrap=True), Column("host", no_wrap=True), "gpu",
                     "dph_total", "reason",
                     title=f"{listing['rejected_total']} rejected")
    for row in listing["rejected"]:
        rejected.add_row(str(row["offer_id"]), str(row["host_id"]),
                         f"{row['num_gpus']}x {row['gpu_name']}", _num(row["dph_total"], 3),
                         row["reason"])
    console().print(rejected)


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
