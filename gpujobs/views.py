"""SQL views over the journal that make common audit questions one SELECT.

`job_transitions` derives each transition's source state in SQL with window functions. That
works because every transition event in gpujobs.states leads to one fixed state, except
`CheckpointSaved`, which moves a job only out of `checkpointing`. The SQL is generated from the
transition table, so the two cannot drift apart.
"""

from __future__ import annotations

import sqlite3

from gpujobs.states import TRANSITIONS, JobState

_JOB_EVENTS = """
CREATE VIEW job_events AS
SELECT e.seq, e.stream AS job_id, e.version, e.type, e.schema_version, e.data,
       e.recorded_at, strftime('%Y-%m-%dT%H:%M:%fZ', e.recorded_at, 'unixepoch') AS recorded_utc,
       json_extract(e.data, '$.attempt') AS attempt,
       j.name, j.team, j.project, j.profile_name, j.state AS job_state
FROM events AS e LEFT JOIN jobs AS j ON j.job_id = e.stream
"""

_JOB_COSTS = """
CREATE VIEW job_costs AS
SELECT c.job_id, c.attempt, j.name, j.team, j.project, a.gpu_name, c.instance_id,
       c.amount_usd, c.billed_s, c.accruals, c.first_recorded_at, c.last_recorded_at
FROM (
    SELECT stream AS job_id, json_extract(data, '$.attempt') AS attempt,
           MAX(json_extract(data, '$.instance_id')) AS instance_id,
           SUM(json_extract(data, '$.amount_usd')) AS amount_usd,
           SUM(json_extract(data, '$.billed_s')) AS billed_s,
           COUNT(*) AS accruals, MIN(recorded_at) AS first_recorded_at,
           MAX(recorded_at) AS last_recorded_at
    FROM events WHERE type = 'CostAccrued'
    GROUP BY stream, json_extract(data, '$.attempt')
) AS c
LEFT JOIN jobs AS j ON j.job_id = c.job_id
LEFT JOIN attempts AS a ON a.job_id = c.job_id AND a.attempt = c.attempt
"""


def _fixed_destinations() -> dict[str, str]:
    """Map each transition event to its one destination, leaving out CheckpointSaved."""
    destinations: dict[str, str] = {}
    for transition in TRANSITIONS:
        if transition.event != "CheckpointSaved":
            destinations[transition.event] = transition.dest.value
    return destinations


def _job_transitions_sql() -> str:
    fixed = _fixed_destinations()
    dest_case = " ".join(f"WHEN '{event}' THEN '{dest}'" for event, dest in fixed.items())
    fixed_types = ", ".join(f"'{event}'" for event in fixed)
    frame = "PARTITION BY stream ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING"
    checkpointing, running = JobState.CHECKPOINTING.value, JobState.RUNNING.value
    return f"""
CREATE VIEW job_transitions AS
WITH marked AS (
    SELECT seq, stream, version, type, data, recorded_at,
           CASE type {dest_case} END AS fixed_dest
    FROM events WHERE type IN ({fixed_types}, 'CheckpointSaved')
), windowed AS (
    SELECT *,
           MAX(CASE WHEN fixed_dest IS NOT NULL THEN printf('%020d', seq) || fixed_dest END)
               OVER ({frame}) AS last_fixed,
           MAX(CASE WHEN type = 'CheckpointSaved' THEN seq END) OVER ({frame}) AS last_saved
    FROM marked
), sourced AS (
    SELECT *,
           CASE
               WHEN last_fixed IS NULL THEN '{JobState.QUEUED.value}'
               WHEN substr(last_fixed, 21) = '{checkpointing}'
                    AND last_saved > CAST(substr(last_fixed, 1, 20) AS INTEGER) THEN '{running}'
               ELSE substr(last_fixed, 21)
           END AS from_state
    FROM windowed
)
SELECT s.seq, s.stream AS job_id, s.version, s.type AS event, s.from_state,
       COALESCE(s.fixed_dest, '{running}') AS to_state,
       json_extract(s.data, '$.attempt') AS attempt, s.recorded_at,
       strftime('%Y-%m-%dT%H:%M:%fZ', s.recorded_at, 'unixepoch') AS recorded_utc,
       j.team, j.project
FROM sourced AS s LEFT JOIN jobs AS j ON j.job_id = s.stream
WHERE s.fixed_dest IS NOT NULL OR s.from_state = '{checkpointing}'
"""


def view_statements() -> dict[str, str]:
    """Return the CREATE VIEW statement of every view, by view name."""
    return {
        "job_events": _JOB_EVENTS.strip(),
        "job_transitions": _job_transitions_sql().strip(),
        "job_costs": _JOB_COSTS.strip(),
    }


def create_views(conn: sqlite3.Connection) -> None:
    """Create the views, replacing any whose stored definition differs from this code's.

    Needs the `events`, `jobs` and `attempts` tables. Runs inside the caller's transaction
    when there is one (JobsProjection.create opens one).
    """
    stored = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'view'"))
    for name, statement in view_statements().items():
        if stored.get(name) == statement:
            continue
        if name in stored:
            conn.execute(f"DROP VIEW {name}")
        conn.execute(statement)
