"""Fault plans for the emulator: preemptions, host failures, vanishing offers, bad responses.

A plan is a list of rules, loadable from YAML or JSON, for example::

    rules:
      - {kind: preempt, after_s: 5, sigterm: true, grace_s: 3, instance: first}
      - {kind: burst_429, endpoint: "PUT /asks/{id}/", count: 2}
      - {kind: offer_vanishes, probability: 0.3}
      - {kind: burst_5xx, probability: 0.1, status: 503}

Timed kinds (preempt, offline, unknown) and slow_loading count emulated seconds, which the
emulator divides by its time scale; HTTP delays (slow) are real seconds, since they stand for
network latency that the client's timeouts measure on a real clock.

Endpoints are named as ``"METHOD /path/"`` with ids replaced by ``{id}`` and without the
``/api/v0`` prefix. A rule's endpoint matches when it equals that name or is a substring of it.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from gpujobs.emulator.errors import FaultPlanError

# Timed kinds: "offline" and "unknown" are the two statuses a dropped host shows.
TIMED_KINDS = frozenset({"preempt", "offline", "unknown"})
HTTP_KINDS = frozenset({"burst_429", "burst_5xx", "slow", "malformed", "search_quota",
                        "disconnect"})
KINDS = TIMED_KINDS | HTTP_KINDS | {"offer_vanishes", "slow_loading"}
# Bodies of an injected 429: the plain text most endpoints send, or one of two JSON forms.
RATE_LIMIT_BODIES = ("text", "detail", "json")


@dataclass(frozen=True)
class FaultRule:
    """One fault. Fields that a kind does not use are ignored."""

    kind: str
    instance: str | int = "first"  # "first", "all" or an instance id (timed and slow_loading)
    after_s: float = 0.0  # emulated seconds after the instance starts running (timed kinds)
    sigterm: bool = True  # preempt: SIGTERM first, then SIGKILL after grace_s
    grace_s: float = 5.0
    endpoint: str | None = None  # HTTP kinds: None means every API endpoint
    count: int | None = None  # how many times the rule fires; None = always (slow), once otherwise
    # Chance per create (offer_vanishes) or per matching request (HTTP kinds), drawn from the
    # seed. With a probability, count caps the firings and None means no cap.
    probability: float | None = None
    status: int = 503  # burst_5xx
    retry_after_s: float | None = None  # burst_429: Retry-After header to send
    body: str = "text"  # burst_429: "text", "detail" ({"detail": ...}) or "json" (success false)
    delay_s: float = 1.0  # slow: seconds added before the response
    form: str = "html"  # malformed: "html" or "truncated"
    extra_s: float = 5.0  # slow_loading: emulated seconds added to loading

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], index: int = 0) -> "FaultRule":
        """Validate one rule; raises FaultPlanError naming the rule index and the field."""
        if not isinstance(data, Mapping):
            raise FaultPlanError(f"fault rule {index} must be a mapping, got {data!r}")
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FaultPlanError(f"fault rule {index}: unknown field(s) {', '.join(unknown)}; "
                                 f"known fields are {', '.join(sorted(known))}")
        kind = data.get("kind")
        if kind not in KINDS:
            raise FaultPlanError(f"fault rule {index}: kind {kind!r} is invalid; use one of "
                                 f"{', '.join(sorted(KINDS))}")
        try:
            rule = cls(**dict(data))
        except TypeError as exc:
            raise FaultPlanError(f"fault rule {index}: {exc}") from exc
        rule._validate(index)
        return rule

    def _validate(self, index: int) -> None:
        for name in ("after_s", "grace_s", "delay_s", "extra_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise FaultPlanError(f"fault rule {index} ({self.kind}): {name} must be a "
                                     f"number >= 0, got {value!r}")
        if self.count is not None and (not isinstance(self.count, int) or self.count < 1):
            raise FaultPlanError(f"fault rule {index} ({self.kind}): count must be an integer "
                                 f">= 1, got {self.count!r}")
        if self.probability is not None and not 0 <= self.probability <= 1:
            raise FaultPlanError(f"fault rule {index} ({self.kind}): probability must be "
                                 f"between 0 and 1, got {self.probability!r}")
        if self.form not in ("html", "truncated"):
            raise FaultPlanError(f"fault rule {index}: form must be 'html' or 'truncated', "
                                 f"got {self.form!r}")
        if self.body not in RATE_LIMIT_BODIES:
            raise FaultPlanError(f"fault rule {index}: body must be one of "
                                 f"{', '.join(RATE_LIMIT_BODIES)}, got {self.body!r}")
        if not (isinstance(self.instance, int) or self.instance in ("first", "all")):
            raise FaultPlanError(f"fault rule {index}: instance must be 'first', 'all' or an "
                                 f"instance id, got {self.instance!r}")
        if self.kind == "burst_5xx" and not 500 <= self.status <= 599:
            raise FaultPlanError(f"fault rule {index}: status must be 5xx, got {self.status}")

    def matches_endpoint(self, endpoint: str) -> bool:
        return self.endpoint is None or self.endpoint == endpoint or self.endpoint in endpoint


@dataclass(frozen=True)
class FaultPlan:
    rules: tuple[FaultRule, ...] = ()

    @classmethod
    def from_data(cls, data: Any) -> "FaultPlan":
        """Build a plan from ``{"rules": [...]}`` or a bare list of rules."""
        if data is None:
            return cls()
        if isinstance(data, Mapping):
            data = data.get("rules", [])
        if not isinstance(data, list):
            raise FaultPlanError(f"a fault plan must be a list of rules or {{'rules': [...]}}, "
                                 f"got {type(data).__name__}")
        return cls(tuple(FaultRule.from_dict(item, index) for index, item in enumerate(data)))

    @classmethod
    def from_file(cls, path: Path | str) -> "FaultPlan":
        """Load a plan from a YAML or JSON file (JSON is valid YAML)."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise FaultPlanError(f"fault plan {path} is not UTF-8 text (byte "
                                 f"{exc.object[exc.start]:#04x} at offset {exc.start}); "
                                 "save it as UTF-8") from exc
        except OSError as exc:
            raise FaultPlanError(f"cannot read fault plan {path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise FaultPlanError(f"fault plan {path} is not valid YAML or JSON: {exc}") from exc
        try:
            return cls.from_data(data)
        except FaultPlanError as exc:
            raise FaultPlanError(f"{path}: {exc}") from exc

    def with_rules(self, rules: tuple[FaultRule, ...]) -> "FaultPlan":
        """Return a plan with ``rules`` added after this plan's own."""
        return FaultPlan(self.rules + tuple(rules))

    def to_data(self) -> dict[str, Any]:
        return {"rules": [asdict(rule) for rule in self.rules]}

    def to_json(self) -> str:
        return json.dumps(self.to_data())


@dataclass
class HttpFault:
    """The changes the HTTP layer applies to one request."""

    delay_s: float = 0.0
    status: int | None = None  # replace the response with this status
    retry_after_s: float | None = None
    search_quota: bool = False
    malformed: str | None = None  # corrupt the handler's response: "html" or "truncated"
    rate_limit_body: str = "text"  # the form of an injected 429 body
    disconnect: bool = False  # run the handler, then close the connection without a reply

    @property
    def replaces_response(self) -> bool:
        return self.status is not None or self.malformed is not None or self.disconnect


class FaultState:
    """A plan plus the counters and random draws that make it fire, deterministic per seed."""

    def __init__(self, plan: FaultPlan, seed: int):
        self.plan = plan
        self._rng = random.Random(seed)
        self._remaining = {index: rule.count for index, rule in enumerate(plan.rules)}
        self._first_taken: set[int] = set()

    def _consume(self, index: int, default_once: bool = True) -> bool:
        remaining = self._remaining[index]
        if remaining is None:
            return not default_once or self._take_unlimited(index)
        if remaining <= 0:
            return False
        self._remaining[index] = remaining - 1
        return True

    def _take_unlimited(self, index: int) -> bool:
        # A rule without count fires once, unless its kind is meant to persist (slow).
        self._remaining[index] = 0
        return True

    def _fires(self, index: int, rule: FaultRule, default_once: bool = True) -> bool:
        """Decide whether the rule fires now: a seeded draw when it has a probability."""
        if rule.probability is None:
            return self._consume(index, default_once)
        if self._rng.random() >= rule.probability:
            return False
        return self._remaining[index] is None or self._consume(index)

    def http_fault(self, endpoint: str) -> HttpFault:
        fault = HttpFault()
        for index, rule in enumerate(self.plan.rules):
            if rule.kind not in HTTP_KINDS or not rule.matches_endpoint(endpoint):
                continue
            if rule.kind == "slow":
                if self._fires(index, rule, default_once=False):
                    fault.delay_s += rule.delay_s
            elif not fault.replaces_response and self._fires(index, rule):
                self._apply(rule, fault)
        return fault

    @staticmethod
    def _apply(rule: FaultRule, fault: HttpFault) -> None:
        if rule.kind == "burst_429":
            fault.status, fault.retry_after_s = 429, rule.retry_after_s
            fault.rate_limit_body = rule.body
        elif rule.kind == "search_quota":
            fault.status, fault.search_quota = 429, True
        elif rule.kind == "burst_5xx":
            fault.status = rule.status
        elif rule.kind == "malformed":
            fault.malformed = rule.form
        elif rule.kind == "disconnect":
            fault.disconnect = True

    def offer_vanishes(self) -> bool:
        """Decide whether another renter takes the offer just before this create."""
        for index, rule in enumerate(self.plan.rules):
            if rule.kind == "offer_vanishes" and self._fires(index, rule):
                return True
        return False

    def _selects(self, index: int, rule: FaultRule, instance_id: int) -> bool:
        if rule.instance == "all":
            return True
        if rule.instance == "first":
            if index in self._first_taken:
                return False
            self._first_taken.add(index)
            return True
        return int(rule.instance) == instance_id

    def timed_rules(self, instance_id: int) -> list[FaultRule]:
        """Return the timed rules (preempt, host drops) to schedule for a starting instance."""
        return [rule for index, rule in enumerate(self.plan.rules)
                if rule.kind in TIMED_KINDS and self._selects(index, rule, instance_id)]

    def extra_loading_s(self, instance_id: int) -> float:
        return sum(rule.extra_s for index, rule in enumerate(self.plan.rules)
                   if rule.kind == "slow_loading" and self._selects(index, rule, instance_id))


def rules_from_flags(*, preempt_after_s: float | None = None, preempt_grace_s: float = 5.0,
                     hard_kill: bool = False, offline_after_s: float | None = None,
                     unknown_after_s: float | None = None, fail_rate: float | None = None,
                     slow_s: float | None = None,
                     vanish_rate: float | None = None) -> tuple[FaultRule, ...]:
    """Build rules from command-line flags; raises FaultPlanError naming the flag.

    Timed rules apply to every instance. ``fail_rate`` is the share of API requests that
    fail with a 503, ``slow_s`` delays every API request, and ``vanish_rate`` is the chance
    that an offer is taken between search and create.
    """
    for flag, value in (("--preempt-after", preempt_after_s), ("--preempt-grace", preempt_grace_s),
                        ("--offline-after", offline_after_s), ("--unknown-after", unknown_after_s),
                        ("--slow-s", slow_s)):
        if value is not None and value < 0:
            raise FaultPlanError(f"{flag} must be a number of seconds >= 0, got {value:g}")
    for flag, value in (("--fail-rate", fail_rate), ("--vanish-rate", vanish_rate)):
        if value is not None and not 0 <= value <= 1:
            raise FaultPlanError(f"{flag} must be a probability between 0 and 1, got {value:g}")

    rules: list[FaultRule] = []
    if preempt_after_s is not None:
        rules.append(FaultRule("preempt", instance="all", after_s=preempt_after_s,
                               sigterm=not hard_kill, grace_s=preempt_grace_s))
    if offline_after_s is not None:
        rules.append(FaultRule("offline", instance="all", after_s=offline_after_s))
    if unknown_after_s is not None:
        rules.append(FaultRule("unknown", instance="all", after_s=unknown_after_s))
    if fail_rate:
        rules.append(FaultRule("burst_5xx", probability=fail_rate, status=503))
    if slow_s:
        rules.append(FaultRule("slow", delay_s=slow_s))
    if vanish_rate:
        rules.append(FaultRule("offer_vanishes", probability=vanish_rate))
    return tuple(rules)
