"""Offer choice: re-check the profile locally, drop hosts that failed, rank what is left.

The API's results can violate the filters sent and leave fields null, so every offer is
checked again here before money is spent on it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gpujobs.profiles import Profile
from gpujobs.vast.records import Offer


@dataclass(frozen=True)
class RankedOffer:
    offer: Offer
    rank: int
    bid_price: float | None  # None for on-demand
    reason: str  # why it stands where it does, for `gpujobs offers`


@dataclass(frozen=True)
class Rejected:
    offer: Offer
    reason: str


def bid_for(offer: Offer, profile: Profile) -> float | None:
    """Bid for an interruptible offer: min_bid plus the margin, never above max_dph."""
    if not profile.interruptible:
        return None
    floor = offer.min_bid if offer.min_bid is not None else offer.dph_total
    if floor is None:
        return None
    return round(min(floor * (1.0 + profile.bid_margin), profile.max_dph), 4)


def hourly_price(offer: Offer, profile: Profile) -> float | None:
    bid = bid_for(offer, profile)
    return bid if bid is not None else offer.dph_total


def check_offer(offer: Offer, profile: Profile, excluded_hosts: set[int],
                excluded_machines: set[int]) -> str | None:
    """Return why an offer does not fit the profile, or None if it fits."""
    if offer.gpu_name not in profile.gpu_names:
        return f"gpu {offer.gpu_name!r} is not {' or '.join(profile.gpu_names)}"
    if offer.num_gpus != profile.num_gpus:
        return f"{offer.num_gpus} GPUs, profile needs {profile.num_gpus}"
    price = hourly_price(offer, profile)
    if price is None or price > profile.max_dph:
        return f"price {price} $/h is above max_dph {profile.max_dph}"
    if offer.reliability is None or offer.reliability < profile.reliability_min:
        return f"reliability {offer.reliability} is below {profile.reliability_min}"
    if offer.host_id is not None and offer.host_id in excluded_hosts:
        return f"host {offer.host_id} failed this job before"
    if offer.machine_id is not None and offer.machine_id in excluded_machines:
        return f"machine {offer.machine_id} failed before"
    return None


def rank_offers(
    offers: Iterable[Offer], profile: Profile, *, excluded_hosts: Iterable[int] = (),
    excluded_machines: Iterable[int] = (), taken_offer_ids: Iterable[int] = (),
) -> tuple[list[RankedOffer], list[Rejected]]:
    """Rank fitting offers cheapest first; ties go to more dlperf per dollar, then reliability."""
    hosts, machines, taken = set(excluded_hosts), set(excluded_machines), set(taken_offer_ids)
    fitting: list[Offer] = []
    rejected: list[Rejected] = []
    for offer in offers:
        reason = "already taken by another job" if offer.id in taken else check_offer(
            offer, profile, hosts, machines
        )
        if reason is None:
            fitting.append(offer)
        else:
            rejected.append(Rejected(offer, reason))
    fitting.sort(key=lambda o: (
        hourly_price(o, profile) or 0.0, -(o.dlperf_per_dphtotal or 0.0), -(o.reliability or 0.0),
        o.id,
    ))
    ranked = [
        RankedOffer(offer, index + 1, bid_for(offer, profile), _describe(offer, profile, index))
        for index, offer in enumerate(fitting)
    ]
    return ranked, rejected


def _describe(offer: Offer, profile: Profile, index: int) -> str:
    price = hourly_price(offer, profile) or 0.0
    parts = [f"${price:.3f}/h"]
    if profile.interruptible:
        parts.append(f"bid from min_bid ${offer.min_bid or 0:.3f} + {profile.bid_margin:.0%}")
    if offer.dlperf_per_dphtotal:
        parts.append(f"{offer.dlperf_per_dphtotal:.1f} dlperf/$")
    parts.append(f"reliability {offer.reliability:.3f}")
    lead = "cheapest fitting offer" if index == 0 else "next by price"
    return f"{lead}: " + ", ".join(parts)
