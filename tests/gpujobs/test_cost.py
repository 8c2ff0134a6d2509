"""Cost per attempt and the useful/waste split, from hand-built event histories."""

from __future__ import annotations

from typing import Any

import pytest

from gpujobs.cost import IDLE, LOST, PROVISIONING, USEFUL, job_cost, job_costs, pieces_between
from gpujobs.cost_report import StoredEvent

DPH = 3.6  # $0.001 per billed second
STORAGE_DPH = 0.36


def history() -> list[StoredEvent]:
    """Attempt 1: provisioning 20 s, checkpoint at step 50, lost 30 s at a preemption, 20 s idle.

    Attempt 2: resumes after 10 s, runs, is stopped for a while (storage rate), completes.
    """
    rows: list[tuple[float, str, dict[str, Any]]] = [
        (1000, "JobSubmitted", {"job_id": "j", "name": "j", "team": "t", "project": "p"}),
        (1000, "OfferSelected", {"attempt": 1, "host_id": 7, "gpu_name": "RTX 4090"}),
        (1010, "InstanceCreated", {"attempt": 1, "instance_id": 11, "dph_total": DPH}),
        (1030, "WorkerStarted", {"attempt": 1, "step": 0}),
        (1060, "CostAccrued", {"attempt": 1, "instance_id": 11, "amount_usd": 0.05,
                               "billed_s": 50.0, "dph_total": DPH, "through": 1060}),
        (1070, "CheckpointStarted", {"attempt": 1, "step": 50}),
        (1075, "CheckpointSaved", {"attempt": 1, "step": 50}),
        (1100, "PreemptionDetected", {"attempt": 1, "reason": "outbid"}),
        (1110, "InstanceDestroyRequested", {"attempt": 1, "instance_id": 11}),
        (1120, "CostAccrued", {"attempt": 1, "instance_id": 11, "amount_usd": 0.06,
                               "billed_s": 60.0, "dph_total": DPH, "through": 1120}),
        (1120, "InstanceDestroyed", {"attempt": 1, "instance_id": 11}),
        (1130, "OfferSelected", {"attempt": 2, "host_id": 8, "gpu_name": "RTX 3090"}),
        (1140, "InstanceCreated", {"attempt": 2, "instance_id": 22, "dph_total": DPH}),
        (1150, "JobResumed", {"attempt": 2, "from_step": 50}),
        (1160, "CostAccrued", {"attempt": 2, "instance_id": 22, "amount_usd": 0.02,
                               "billed_s": 20.0, "dph_total": DPH, "through": 1160}),
        (1200, "CostAccrued", {"attempt": 2, "instance_id": 22, "amount_usd": 0.004,
                               "billed_s": 40.0, "dph_total": STORAGE_DPH, "through": 1200}),
        (1210, "JobCompleted", {"attempt": 2, "step": 100}),
        (1220, "CostAccrued", {"attempt": 2, "instance_id": 22, "amount_usd": 0.02,
                               "billed_s": 20.0, "dph_total": DPH, "through": 1220}),
        (1220, "InstanceDestroyed", {"attempt": 2, "instance_id": 22}),
    ]
    return [StoredEvent(seq, "j", kind, data, float(at))
            for seq, (at, kind, data) in enumerate(rows, start=1)]


def test_attempt_costs_and_split() -> None:
    cost = job_cost("j", history())
    first, second = cost.attempts
    assert first.cost_usd == pytest.approx(0.11)
    assert first.billed_s == pytest.approx(110.0)
    assert first.by_category[PROVISIONING] == pytest.approx(0.02)
    assert first.by_category[USEFUL] == pytest.approx(0.04)
    assert first.by_category[LOST] == pytest.approx(0.03)
    assert first.by_category[IDLE] == pytest.approx(0.02)
    assert second.cost_usd == pytest.approx(0.044)
    assert second.by_category[PROVISIONING] == pytest.approx(0.01)
    assert second.by_category[USEFUL] == pytest.approx(0.02)
    assert second.by_category[LOST] == 0.0
    assert second.by_category[IDLE] == pytest.approx(0.014)  # 0.004 stopped + 0.01 after done


def test_job_totals_and_metadata() -> None:
    cost = job_cost("j", history())
    assert (cost.team, cost.project) == ("t", "p")
    assert cost.cost_usd == pytest.approx(0.154)
    assert cost.useful_usd == pytest.approx(0.06)
    assert cost.waste_usd == pytest.approx(0.094)
    assert [a.gpu_name for a in cost.attempts] == ["RTX 4090", "RTX 3090"]
    assert [a.host_id for a in cost.attempts] == [7, 8]
    assert sum(p.amount_usd for p in cost.pieces) == pytest.approx(cost.cost_usd)


def test_emergency_checkpoint_loses_nothing() -> None:
    events = history()
    # The checkpoint of step 60 starts at the SIGTERM, after the loss was detected.
    extra = [
        StoredEvent(100, "j", "CheckpointStarted", {"attempt": 1, "step": 60}, 1101.0),
        StoredEvent(101, "j", "CheckpointSaved", {"attempt": 1, "step": 60}, 1102.0),
    ]
    events = events[:8] + extra + events[8:]
    first = job_cost("j", events).attempts[0]
    assert first.by_category[LOST] == 0.0
    assert first.by_category[USEFUL] == pytest.approx(0.07)


def test_attempt_without_checkpoint_loses_whole_run() -> None:
    events = [e for e in history() if e.type not in ("CheckpointStarted", "CheckpointSaved")]
    first = job_cost("j", events).attempts[0]
    assert first.by_category[USEFUL] == 0.0
    assert first.by_category[LOST] == pytest.approx(0.07)


def test_worker_never_started_is_provisioning() -> None:
    events = [e for e in history() if e.type != "WorkerStarted"]
    first = job_cost("j", events).attempts[0]
    assert first.by_category[PROVISIONING] == pytest.approx(0.11)


def test_pieces_between_prorates() -> None:
    cost = job_cost("j", history())
    kept = pieces_between(cost.pieces, 1010.0, 1035.0)
    assert sum(p.amount_usd for p in kept) == pytest.approx(0.025)
    assert {p.category for p in kept} == {PROVISIONING, USEFUL}


def test_job_costs_groups_streams() -> None:
    other = [StoredEvent(e.seq + 1000, "k", e.type, e.data, e.recorded_at) for e in history()]
    costs = job_costs(history() + other)
    assert [c.job_id for c in costs] == ["j", "k"]
    assert costs[1].cost_usd == pytest.approx(0.154)


def test_requested_stop_is_not_a_loss() -> None:
    events = history()
    request = StoredEvent(99, "j", "CancelRequested", {"requested_by": "me"}, 1090.0)
    events = events[:7] + [request] + events[7:]
    first = job_cost("j", events).attempts[0]
    assert first.by_category[LOST] == 0.0
    assert first.by_category[USEFUL] == pytest.approx(0.07)


def settled(events: list[StoredEvent], attempt: int, instance_id: int, charged_usd: float,
            estimate_usd: float, at: float) -> list[StoredEvent]:
    data = {"attempt": attempt, "instance_id": instance_id,
            "amount_usd": charged_usd - estimate_usd, "billed_s": 0.0, "dph_total": DPH,
            "through": at, "settled_usd": charged_usd}
    return [*events, StoredEvent(len(events) + 1, "j", "CostAccrued", data, at + 5)]


def test_settlement_scales_the_split() -> None:
    cost = job_cost("j", settled(history(), 1, 11, 0.132, 0.11, 1120))
    first = cost.attempts[0]
    assert first.cost_usd == pytest.approx(0.132)
    assert first.billed_s == pytest.approx(110.0)
    assert first.by_category[PROVISIONING] == pytest.approx(0.024)
    assert first.by_category[USEFUL] == pytest.approx(0.048)
    assert first.by_category[LOST] == pytest.approx(0.036)
    assert first.by_category[IDLE] == pytest.approx(0.024)
    assert cost.attempts[1].cost_usd == pytest.approx(0.044)
    assert first.settled is True
    assert cost.attempts[1].settled is False


def test_settlement_of_exact_estimate_counts() -> None:
    first = job_cost("j", settled(history(), 1, 11, 0.11, 0.11, 1120)).attempts[0]
    assert first.cost_usd == pytest.approx(0.11)
    assert first.settled is True


def test_settlement_without_estimate_is_idle() -> None:
    events = [e for e in history() if not (e.type == "CostAccrued" and e.data["attempt"] == 1)]
    first = job_cost("j", settled(events, 1, 11, 0.05, 0.0, 1120)).attempts[0]
    assert first.cost_usd == pytest.approx(0.05)
    assert first.by_category[IDLE] == pytest.approx(0.05)
    assert first.by_category[USEFUL] == 0.0


def test_split_starts_at_create_call() -> None:
    # The first bill covers 55 s: from the moment the create call went out (1005), five
    # seconds before its outcome was journaled. That time is provisioning too.
    events = history()
    created = events[2]
    events[2] = StoredEvent(created.seq, "j", "InstanceCreated",
                            {**created.data, "billed_from": 1005.0}, created.recorded_at)
    events[4] = StoredEvent(events[4].seq, "j", "CostAccrued",
                            {**events[4].data, "amount_usd": 0.055, "billed_s": 55.0},
                            events[4].recorded_at)
    first = job_cost("j", events).attempts[0]
    assert first.by_category[PROVISIONING] == pytest.approx(0.025)
    assert first.by_category[USEFUL] == pytest.approx(0.04)
    before_reply = pieces_between(job_cost("j", events).pieces, 1005.0, 1010.0)
    assert sum(p.amount_usd for p in before_reply) == pytest.approx(0.005)
