"""Concurrency limits: live instances in total and per team, from limits.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gpujobs.errors import ConfigError
from gpujobs.yamlfile import FieldReader, Located, load_yaml


@dataclass(frozen=True)
class Limits:
    max_instances: int | None = None  # None: no limit
    teams: dict[str, int] = field(default_factory=dict)

    def blocked(self, team: str, live_total: int, live_by_team: dict[str, int]) -> str | None:
        """Return why one more instance for `team` would break a limit, or None."""
        if self.max_instances is not None and live_total >= self.max_instances:
            return f"concurrency limit: {live_total}/{self.max_instances} instances alive"
        team_limit = self.teams.get(team)
        if team_limit is not None and live_by_team.get(team, 0) >= team_limit:
            return (f"concurrency limit: team {team} has {live_by_team.get(team, 0)}/"
                    f"{team_limit} instances alive")
        return None


def load_limits(paths: list[Path]) -> Limits:
    """Merge limits files in order; later files override earlier keys."""
    limits = Limits()
    for path in paths:
        limits = _merge(limits, _load(path))
    return limits


def _load(path: Path) -> Limits:
    document = load_yaml(path)
    if document is None:
        return Limits()
    if not isinstance(document, Located):
        raise ConfigError("expected a mapping with max_instances and teams", path=str(path))
    fields = FieldReader(document, "limits")
    total = fields.integer("max_instances", required=False, minimum=0)
    teams_node = fields.raw("teams")
    fields.reject_unknown({"max_instances", "teams"})
    teams: dict[str, int] = {}
    if teams_node is not None:
        if not isinstance(teams_node, Located):
            raise ConfigError("limits: teams: expected a mapping of team: max instances",
                              path=str(path), line=document.line_of("teams"), key="teams")
        team_fields = FieldReader(teams_node, "limits: teams")
        for team in teams_node.values:
            teams[team] = team_fields.integer(team, minimum=0) or 0
    return Limits(max_instances=total, teams=teams)


def _merge(base: Limits, override: Limits) -> Limits:
    total = override.max_instances if override.max_instances is not None else base.max_instances
    return Limits(max_instances=total, teams={**base.teams, **override.teams})
