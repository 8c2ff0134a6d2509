"""GPU profiles: named bundles of what a job may rent, loaded from gpu_profiles.yaml."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpujobs.errors import ConfigError, UnknownProfile
from gpujobs.yamlfile import FieldReader, Located, load_yaml

# GPU names as the Vast.ai server spells them. A profile may name a family (A100) that
# stands for every entry that starts with it.
KNOWN_GPU_NAMES = (
    "RTX 3060", "RTX 3070", "RTX 3080", "RTX 3090", "RTX 3090 Ti", "RTX 4070", "RTX 4080",
    "RTX 4090", "RTX 4090 Ti", "RTX 5090", "RTX A4000", "RTX A5000", "RTX A6000", "RTX 6000Ada",
    "Q RTX 8000", "A10", "A40", "L4", "L40", "L40S", "A100 PCIE", "A100 SXM4", "A100X",
    "H100 PCIE", "H100 SXM", "H100 NVL", "H200", "H200 NVL", "B200", "B300", "Tesla T4",
    "Tesla V100",
)

PROFILE_KEYS = {
    "gpu_name", "num_gpus", "max_dph", "reliability_min", "max_duration_hours", "interruptible",
    "bid_margin", "extra_filters", "disk_gb", "image", "on_preemption", "max_restarts",
    "loading_timeout_s", "description",
}


@dataclass(frozen=True)
class Profile:
    name: str
    gpu_names: tuple[str, ...]  # server spelling; one entry unless the profile names a family
    num_gpus: int
    max_dph: float
    reliability_min: float
    max_duration_hours: float
    interruptible: bool = False
    bid_margin: float = 0.10  # bid = min_bid * (1 + margin), never above max_dph
    extra_filters: str = ""  # vastai CLI query language, e.g. "inet_down>200 cuda_vers>=12.1"
    disk_gb: float = 10.0
    image: str = "gpujobs/worker:latest"
    on_preemption: str = "migrate"  # migrate to a new offer, or wait for the same host
    max_restarts: int = 3  # restarts after worker errors; preemptions are not counted
    loading_timeout_s: float = 900.0
    description: str = ""

    @property
    def worst_case_usd(self) -> float:
        return self.max_dph * self.max_duration_hours

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["gpu_names"] = list(self.gpu_names)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        values = dict(data)
        values["gpu_names"] = tuple(values["gpu_names"])
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def gpu_names_for(spelled: str) -> tuple[str, ...]:
    """Map a profile's gpu_name (RTX_4090, RTX 4090, or a family such as A100) to server names."""
    name = spelled.replace("_", " ").strip()
    exact = [known for known in KNOWN_GPU_NAMES if known.lower() == name.lower()]
    if exact:
        return (exact[0],)
    family = [known for known in KNOWN_GPU_NAMES if known.lower().startswith(name.lower() + " ")]
    if family:
        return tuple(family)
    return (name,)


def parse_profile(name: str, mapping: Located) -> Profile:
    fields = FieldReader(mapping, f"profile {name!r}")
    gpu_name = fields.string("gpu_name")
    profile = Profile(
        name=name,
        gpu_names=gpu_names_for(gpu_name or ""),
        num_gpus=fields.integer("num_gpus", minimum=1) or 1,
        max_dph=fields.number("max_dph", minimum=0.0, exclusive_minimum=True, maximum=1000.0)
        or 0.0,
        reliability_min=fields.number("reliability_min", minimum=0.0, maximum=1.0) or 0.0,
        max_duration_hours=fields.number(
            "max_duration_hours", minimum=0.0, exclusive_minimum=True, maximum=24 * 365
        ) or 0.0,
        interruptible=bool(fields.boolean("interruptible", required=False, default=False)),
        bid_margin=fields.number("bid_margin", required=False, default=0.10, minimum=0.0,
                                 maximum=10.0) or 0.0,
        extra_filters=fields.string("extra_filters", required=False, default="") or "",
        disk_gb=fields.number("disk_gb", required=False, default=10.0, minimum=1.0) or 10.0,
        image=fields.string("image", required=False, default="gpujobs/worker:latest") or "",
        on_preemption=fields.choice("on_preemption", ("migrate", "wait"), default="migrate"),
        max_restarts=fields.integer("max_restarts", required=False, default=3, minimum=0) or 0,
        loading_timeout_s=fields.number("loading_timeout_s", required=False, default=900.0,
                                        minimum=1.0) or 900.0,
        description=fields.string("description", required=False, default="") or "",
    )
    fields.reject_unknown(PROFILE_KEYS)
    if profile.extra_filters:
        _check_filters(profile, mapping)
    return profile


def _check_filters(profile: Profile, mapping: Located) -> None:
    from gpujobs.vast.query import parse_query  # the query language belongs to the client

    try:
        parse_query(profile.extra_filters)
    except ValueError as exc:
        raise ConfigError(
            f"profile {profile.name!r}: extra_filters: {exc}; use the vastai CLI query form, "
            "for example 'inet_down>200 cuda_vers>=12.1'",
            path=mapping.path, line=mapping.line_of("extra_filters"), key="extra_filters",
        ) from exc


def load_profiles_file(path: Path) -> dict[str, Profile]:
    """Read one gpu_profiles.yaml; raises ConfigError naming file, line and key on any problem."""
    document = load_yaml(path)
    if not isinstance(document, Located):
        raise ConfigError("expected a mapping with a 'profiles' key at the top", path=str(path))
    top = FieldReader(document, "file")
    section = top.raw("profiles")
    top.reject_unknown({"profiles"})
    if not isinstance(section, Located):
        raise ConfigError(
            "expected 'profiles:' followed by named profiles", path=str(path), line=document.line
        )
    profiles: dict[str, Profile] = {}
    for name, body in section.values.items():
        if not isinstance(body, Located):
            raise ConfigError(
                f"profile {name!r} must be a mapping of settings",
                path=str(path), line=section.line_of(name), key=name,
            )
        profiles[name] = parse_profile(name, body)
    return profiles


def load_profiles(paths: list[Path]) -> dict[str, Profile]:
    """Merge profile files in order; a later file replaces a profile of the same name whole."""
    merged: dict[str, Profile] = {}
    for path in paths:
        merged.update(load_profiles_file(path))
    return merged


def get_profile(profiles: dict[str, Profile], name: str) -> Profile:
    try:
        return profiles[name]
    except KeyError:
        raise UnknownProfile(name, list(profiles)) from None


def offer_query(profile: Profile) -> dict[str, Any]:
    """Build the offer search body (vastai JSON query form) that the profile allows."""
    from gpujobs.vast.query import parse_query

    query: dict[str, Any] = parse_query(profile.extra_filters) if profile.extra_filters else (
        parse_query("")
    )
    if len(profile.gpu_names) == 1:
        query["gpu_name"] = {"eq": profile.gpu_names[0]}
    else:
        query["gpu_name"] = {"in": list(profile.gpu_names)}
    query["num_gpus"] = {"eq": profile.num_gpus}
    query["reliability"] = {"gte": profile.reliability_min}
    query["dph_total"] = {"lte": profile.max_dph}
    return query
