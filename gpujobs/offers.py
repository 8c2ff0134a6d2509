"""Offer choice: re-check the profile locally, drop hosts that failed, rank what is left.

The API's results can violate the filters sent and leave fields null, so every offer is
checked again here before money is spent on it. Fitting offers are ranked by value: dlperf
per dollar at the price this job would pay, times the host's reliability (the share of time
a machine from that host is expected to stay up). Offers without a dlperf figure rank after
those with one, cheapest first.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gpujobs.profiles import Profile
from gpujobs.vast.records import Instance, Offer

# attempts.end_reason prefixes that mean the host let the job down. A worker crash
# ("preempted: worker_error: ...") is the job's own fault and does not count.
HOST_FAILURE_PREFIXES = ("preempted: ", "loading timed out", "instance ")
NOT_HOST_FAILURES = ("preempted: worker_error",)
FAILED_HOST_MEMORY_S = 7 * 86400.0


@dataclass(frozen=True)
class RankedOffer:
    offer: Offer
    rank: int
    bid_price: float | None  # None for on-demand
    reason: str  # the reason for its rank, shown by `gpujobs offers`
    price_dph: float = 0.0  # what this job would pay per hour
    score: float | None = None  # dlperf per dollar x reliability; None without dlperf


@dataclass(frozen=True)
class Rejected:
    offer: Offer
    reason: str


def bid_floor(offer: Offer) -> float | None:
    """Return the lowest bid an interruptible offer accepts: min_bid, else its listed dph."""
    return offer.min_bid if offer.min_bid is not None else offer.dph_total


def storage_dph(offer: Offer) -> float:
    """Return the offer's storage price in $/hour: dph_total less dph_base, 0 when unknown.

    A bid pays for the GPU only, so an interruptible instance costs its bid plus this.
    """
    if offer.dph_total is None or offer.dph_base is None:
        return 0.0
    return max(0.0, offer.dph_total - offer.dph_base)


def bid_cap(profile: Profile, storage: float) -> float:
    """Return the highest bid that keeps bid plus storage within max_dph, to 4 decimals."""
    exact = profile.max_dph - storage
    cap = round(exact, 4)
    if cap > exact + 1e-9:  # rounded up: go one step down, but not for float noise
        cap = round(cap - 0.0001, 4)
    return cap


def capped_bid(floor: float, profile: Profile, storage: float = 0.0) -> float | None:
    """Compute the floor plus the margin, within the bid cap; None when the floor is above it.

    The bid is rounded to 4 decimals, but never down below the floor, which would lose.
    """
    cap = bid_cap(profile, storage)
    if floor > cap:
        return None
    bid = round(floor * (1.0 + profile.bid_margin), 4)
    if bid < floor:
        bid = round(bid + 0.0001, 4)
    return min(bid, cap)


def bid_for(offer: Offer, profile: Profile) -> float | None:
    """Bid for an interruptible offer, or None for on-demand or a floor above the bid cap."""
    if not profile.interruptible:
        return None
    floor = bid_floor(offer)
    if floor is None:
        return None
    return capped_bid(floor, profile, storage_dph(offer))


def hourly_price(offer: Offer, profile: Profile) -> float | None:
    """Return what the job would pay per hour: the bid plus storage, or the on-demand dph."""
    bid = bid_for(offer, profile)
    return bid + storage_dph(offer) if bid is not None else offer.dph_total


def offer_score(offer: Offer, profile: Profile) -> float | None:
    """dlperf per dollar at this job's price, times reliability; None without a dlperf."""
    price = hourly_price(offer, profile)
    if offer.dlperf is None or not price:
        return None
    return offer.dlperf / price * (offer.reliability or 0.0)


def outbid_action(profile: Profile, instance: Instance) -> tuple[str, float | None]:
    """Decide what to do with an outbid interruptible instance.

    Returns ("rebid", price) when the profile's on_preemption is rebid and a bid of min_bid
    plus the margin, capped so that bid plus storage stays within max_dph, still reaches the
    instance's current min_bid.
    Otherwise returns ("migrate", None), to find another offer.
    """
    if profile.on_preemption != "rebid" or not profile.interruptible:
        return "migrate", None
    storage = instance_storage_dph(instance)
    price = None if instance.min_bid is None else capped_bid(instance.min_bid, profile, storage)
    if price is None:
        return "migrate", None
    return "rebid", price


def instance_storage_dph(instance: Instance) -> float:
    """Return the instance's storage price in $/hour from the API's storage_total_cost."""
    total = instance.raw.get("storage_total_cost")
    return float(total) if isinstance(total, (int, float)) else 0.0


def check_offer(offer: Offer, profile: Profile, excluded_hosts: Mapping[int, str] | set[int],
                excluded_machines: set[int]) -> str | None:
    """Return why an offer does not fit the profile, or None if it fits."""
    if offer.gpu_name not in profile.gpu_names:
        return f"gpu {offer.gpu_name!r} is not {' or '.join(profile.gpu_names)}"
    if offer.num_gpus != profile.num_gpus:
        return f"{offer.num_gpus} GPUs, profile needs {profile.num_gpus}"
    floor = bid_floor(offer) if profile.interruptible else None
    storage = storage_dph(offer)
    if floor is not None and floor > bid_cap(profile, storage):
        plus = f" plus storage ${storage:.3f}/h" if storage else ""
        return (f"min_bid ${floor:.3f}/h{plus} is above max_dph ${profile.max_dph:.3f}/h; "
                "a bid within the cap would lose")
    price = hourly_price(offer, profile)
    if price is None or price > profile.max_dph:
        shown = "unknown" if price is None else f"${price:.3f}/h"
        return f"price {shown} is above max_dph ${profile.max_dph:.3f}/h"
    if offer.reliability is None or offer.reliability < profile.reliability_min:
        return f"reliability {offer.reliability} is below {profile.reliability_min}"
    if offer.host_id is not None and offer.host_id in excluded_hosts:
        why = excluded_hosts.get(offer.host_id) if isinstance(excluded_hosts, Mapping) else None
        return f"host {offer.host_id} failed before" + (f": {why}" if why else "")
    if offer.machine_id is not None and offer.machine_id in excluded_machines:
        return f"machine {offer.machine_id} failed before"
    return None


def rank_offers(
    offers: Iterable[Offer], profile: Profile, *,
    excluded_hosts: Mapping[int, str] | Iterable[int] = (),
    excluded_machines: Iterable[int] = (), taken_offer_ids: Iterable[int] = (),
) -> tuple[list[RankedOffer], list[Rejected]]:
    """Rank fitting offers best value first; returns (ranked, rejected with the reason)."""
    hosts = excluded_hosts if isinstance(excluded_hosts, Mapping) else set(excluded_hosts)
    machines, taken = set(excluded_machines), set(taken_offer_ids)
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
    fitting.sort(key=lambda offer: _sort_key(offer, profile))
    ranked: list[RankedOffer] = []
    for index, offer in enumerate(fitting):
        after = fitting[index - 1] if index else None
        ranked.append(RankedOffer(
            offer, index + 1, bid_for(offer, profile), _describe(offer, profile, after),
            hourly_price(offer, profile) or 0.0, offer_score(offer, profile),
        ))
    return ranked, rejected


def _sort_key(offer: Offer, profile: Profile) -> tuple[Any, ...]:
    score = offer_score(offer, profile)
    price = hourly_price(offer, profile) or 0.0
    return (score is None, -(score or 0.0), price, -(offer.reliability or 0.0), offer.id)


def _describe(offer: Offer, profile: Profile, after: Offer | None) -> str:
    price = hourly_price(offer, profile) or 0.0
    parts = [f"${price:.3f}/h"]
    if profile.interruptible:
        storage = storage_dph(offer)
        plus = f" + storage ${storage:.3f}" if storage else ""
        parts.append(f"bid = min_bid ${offer.min_bid or 0:.3f} + {profile.bid_margin:.0%}, "
                     f"capped at ${profile.max_dph - storage:.3f}{plus}")
    score = offer_score(offer, profile)
    if score is not None:
        parts.append(f"dlperf {offer.dlperf:.1f} = {offer.dlperf / price:.1f} dlperf/$")
    parts.append(f"reliability {offer.reliability:.3f}")
    summary = ", ".join(parts)
    if score is None:
        return f"no dlperf figure, ranked by price: {summary}"
    if after is None:
        return f"best value {score:.1f} (dlperf/$ x reliability): {summary}"
    previous = offer_score(after, profile)
    behind = f", behind {previous:.1f}" if previous is not None else ""
    return f"value {score:.1f}{behind}: {summary}"


def failed_hosts_from_rows(rows: Iterable[Mapping[str, Any]]) -> dict[int, str]:
    """Hosts whose attempts ended in a preemption or a provisioning failure, with one example.

    `rows` are attempts rows (host_id, job_id, attempt, end_reason); a host that failed
    several times keeps the latest reason given.
    """
    hosts: dict[int, str] = {}
    for row in rows:
        reason = row.get("end_reason") or ""
        host_id = row.get("host_id")
        if host_id is None or not _is_host_failure(reason):
            continue
        hosts[int(host_id)] = f"job {row.get('job_id')} attempt {row.get('attempt')}: {reason}"
    return hosts


def _is_host_failure(reason: str) -> bool:
    if any(reason.startswith(prefix) for prefix in NOT_HOST_FAILURES):
        return False
    return any(reason.startswith(prefix) for prefix in HOST_FAILURE_PREFIXES)


async def load_failed_hosts(store: Any, *, within_s: float = FAILED_HOST_MEMORY_S,
                            now: float | None = None) -> dict[int, str]:
    """Read the journal's attempts table for hosts that failed any job in the last `within_s`.

    One query. Failures older than that are forgotten, so a host that recovered gets rented
    again; attempts not yet destroyed count from now.
    """
    since = (time.time() if now is None else now) - within_s
    rows = await store.query(
        "SELECT host_id, job_id, attempt, end_reason FROM attempts "
        "WHERE host_id IS NOT NULL AND end_reason IS NOT NULL "
        "AND (destroyed_at IS NULL OR destroyed_at >= ?) ORDER BY destroyed_at", (since,),
    )
    return failed_hosts_from_rows(dict(row) for row in rows)
