"""GPU profiles: named bundles of what a job may rent, loaded from gpu_profiles.yaml."""

from __future__ import annotations

import dataclasses
import os
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
    "bid_margin", "extra_filters", "disk_gb", "image", "on_preemption", "resume_wait_s",
    "max_restarts", "loading_timeout_s", "description",
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
    # When outbid: migrate to a new offer, rebid up to max_dph, or wait for the same host to
    # resume the instance; rebid and wait fall back to migrate after resume_wait_s.
    on_preemption: str = "migrate"
    resume_wait_s: float = 600.0
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


ON_PREEMPTION_CHOICES = ("migrate", "rebid", "wait")
ENVIRONMENT_KEYS = {"profiles", "description"}


def parse_profile(name: str, mapping: Located, base: Profile | None = None) -> Profile:
    """Build a profile from its mapping; with `base`, every key is optional and overrides it."""
    fields = FieldReader(mapping, f"profile {name!r}")
    need = base is None
    old = base or Profile(name, (), 1, 0.0, 0.0, 0.0)
    gpu_name = fields.string("gpu_name", required=need)
    gpu_names = _known_gpu_names(fields, gpu_name) if gpu_name else old.gpu_names
    profile = Profile(
        name=name,
        gpu_names=gpu_names,
        num_gpus=_int(fields.integer("num_gpus", required=need, minimum=1, maximum=64),
                      old.num_gpus),
        max_dph=_float(fields.number("max_dph", required=need, minimum=0.0,
                                     exclusive_minimum=True, maximum=1000.0), old.max_dph),
        reliability_min=_float(fields.number("reliability_min", required=need, minimum=0.0,
                                             maximum=1.0), old.reliability_min),
        max_duration_hours=_float(fields.number(
            "max_duration_hours", required=need, minimum=0.0, exclusive_minimum=True,
            maximum=24 * 365,
        ), old.max_duration_hours),
        interruptible=_bool(fields.boolean("interruptible", required=False), old.interruptible),
        bid_margin=_float(fields.number("bid_margin", required=False, minimum=0.0, maximum=10.0),
                          old.bid_margin),
        extra_filters=_str(fields.string("extra_filters", required=False), old.extra_filters),
        disk_gb=_float(fields.number("disk_gb", required=False, minimum=1.0, maximum=65536.0),
                       old.disk_gb),
        image=_str(fields.string("image", required=False), old.image),
        on_preemption=fields.choice("on_preemption", ON_PREEMPTION_CHOICES,
                                    default=old.on_preemption),
        resume_wait_s=_float(fields.number("resume_wait_s", required=False, minimum=0.0),
                             old.resume_wait_s),
        max_restarts=_int(fields.integer("max_restarts", required=False, minimum=0),
                          old.max_restarts),
        loading_timeout_s=_float(fields.number("loading_timeout_s", required=False, minimum=1.0),
                                 old.loading_timeout_s),
        description=_str(fields.string("description", required=False), old.description),
    )
    fields.reject_unknown(PROFILE_KEYS)
    if profile.on_preemption in ("rebid", "wait") and not profile.interruptible:
        raise fields.fail("on_preemption", f"{profile.on_preemption} applies only to "
                          "interruptible profiles; set interruptible: true or use migrate")
    if profile.extra_filters:
        _check_filters(profile, mapping)
    return profile


def _known_gpu_names(fields: FieldReader, spelled: str) -> tuple[str, ...]:
    names = gpu_names_for(spelled)
    if names[0] not in KNOWN_GPU_NAMES:
        raise fields.fail("gpu_name", f"unknown GPU {spelled!r}; use a Vast.ai GPU name such as "
                          "RTX_4090, H100_SXM or a family such as A100 (`_` stands for a space)")
    return names


def _int(value: int | None, default: int) -> int:
    return default if value is None else value


def _float(value: float | None, default: float) -> float:
    return default if value is None else value


def _bool(value: bool | None, default: bool) -> bool:
    return default if value is None else value


def _str(value: str | None, default: str) -> str:
    return default if value is None else value


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


@dataclass(frozen=True)
class ProfilesFile:
    """One gpu_profiles.yaml: its profiles and the raw overrides of each environment."""

    path: Path
    profiles: dict[str, Profile]
    environments: dict[str, Located]  # environment name -> its `profiles:` mapping


def read_profiles_file(path: Path) -> ProfilesFile:
    """Read and check one gpu_profiles.yaml; raises ConfigError naming file, line and key."""
    document = load_yaml(path)
    if not isinstance(document, Located):
        raise ConfigError("expected a mapping with a 'profiles' key at the top", path=str(path))
    top = FieldReader(document, "file")
    section = top.raw("profiles")
    environments = top.raw("environments")
    top.reject_unknown({"profiles", "environments"})
    if section is None and environments is None:
        raise ConfigError("missing required key 'profiles'", path=str(path), line=document.line,
                          key="profiles")
    profiles = _parse_section(section or _empty(document), document, "profiles") if (
        section is not None) else {}
    overrides = _read_environments(environments, document)
    for env_name, body in overrides.items():
        _check_overrides(env_name, body, profiles)
    return ProfilesFile(path, profiles, overrides)


def _empty(document: Located) -> Located:
    return Located({}, {}, document.line, document.path)


def _parse_section(section: Any, parent: Located, key: str) -> dict[str, Profile]:
    if not isinstance(section, Located):
        raise ConfigError(
            f"{key}: expected named profiles (name: {{gpu_name: ..., ...}}), got {_kind(section)}",
            path=parent.path, line=parent.line_of(key), key=key,
        )
    profiles: dict[str, Profile] = {}
    for name, body in section.values.items():
        profiles[name] = parse_profile(name, _profile_body(name, body, section))
    return profiles


def _profile_body(name: str, body: Any, section: Located) -> Located:
    if not isinstance(body, Located):
        raise ConfigError(
            f"profile {name!r} must be a mapping of settings, got {_kind(body)}",
            path=section.path, line=section.line_of(name), key=name,
        )
    return body


def _read_environments(environments: Any, document: Located) -> dict[str, Located]:
    if environments is None:
        return {}
    if not isinstance(environments, Located):
        raise ConfigError(
            f"environments: expected a mapping of environment name to overrides, got "
            f"{_kind(environments)}",
            path=document.path, line=document.line_of("environments"), key="environments",
        )
    found: dict[str, Located] = {}
    for env_name, body in environments.values.items():
        if not isinstance(body, Located):
            raise ConfigError(
                f"environment {env_name!r} must be a mapping with a 'profiles' key",
                path=environments.path, line=environments.line_of(env_name), key=env_name,
            )
        fields = FieldReader(body, f"environment {env_name!r}")
        if "budgets" in body.values or "on_exceeded" in body.values:
            key = "budgets" if "budgets" in body.values else "on_exceeded"
            raise fields.fail(key, f"belongs in budgets.yaml under environments.{env_name}")
        overrides = fields.raw("profiles")
        fields.string("description", required=False)
        fields.reject_unknown(ENVIRONMENT_KEYS)
        if overrides is not None and not isinstance(overrides, Located):
            raise fields.fail("profiles", "expected a mapping of profile name to overrides, "
                              f"got {_kind(overrides)}")
        found[env_name] = overrides if overrides is not None else _empty(body)
    return found


def _check_overrides(env_name: str, overrides: Located, profiles: dict[str, Profile]) -> None:
    """Parse the overrides of profiles this file defines, so errors show at load time."""
    for name, body in overrides.values.items():
        located = _profile_body(name, body, overrides)
        if name in profiles:
            parse_profile(name, located, profiles[name])


def load_profiles_file(path: Path, env: str | None = None) -> dict[str, Profile]:
    """Read one gpu_profiles.yaml, with the overrides of `env` applied."""
    return load_profiles([path], env=env)


def load_profiles(paths: list[Path], env: str | None = None) -> dict[str, Profile]:
    """Merge profile files in order, then apply environment `env` from every file that has it.

    A later file replaces a profile of the same name whole. An environment override changes
    only the keys it names; a profile that only an environment defines must be complete.
    Raises ConfigError when `env` is given and no file defines it.
    """
    files = [read_profiles_file(path) for path in paths]
    merged: dict[str, Profile] = {}
    for file in files:
        merged.update(file.profiles)
    if env is None:
        return merged
    check_environment(env, [(f.path, set(f.environments)) for f in files], "gpu_profiles.yaml")
    for file in files:
        overrides = file.environments.get(env)
        for name, body in (overrides.values.items() if overrides else ()):
            merged[name] = parse_profile(name, body, merged.get(name))
    return merged


def check_environment(env: str, defined: list[tuple[Path, set[str]]], kind: str) -> None:
    """Raise ConfigError unless one of the files defines environment `env`."""
    known = sorted(set().union(*(names for _, names in defined))) if defined else []
    if env in known:
        return
    where = ", ".join(str(path) for path, _ in defined) or f"(no {kind} found)"
    raise ConfigError(
        f"environment {env!r} is not defined in {where}; defined: {', '.join(known) or 'none'}; "
        "add it under 'environments:' or fix GPUJOBS_ENV / --env"
    )


def environment_from(flag: str | None = None) -> str | None:
    """Return the environment to use: the flag, else GPUJOBS_ENV, else None (no overrides)."""
    value = flag or os.environ.get("GPUJOBS_ENV") or None
    return value.strip() or None if value else None


def _kind(value: Any) -> str:
    if isinstance(value, Located):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


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
