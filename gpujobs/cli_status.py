"""The table of `gpujobs status`, fitted to the terminal by leaving out the least needed columns."""

from __future__ import annotations

from collections.abc import Callable

from rich import box
from rich.table import Column, Table

from gpujobs.jobs import JobStatus

# Header, cell, and whether the cell may fold onto more lines; ids and figures never fold.
_COLUMNS: tuple[tuple[str, Callable[[JobStatus], str], bool], ...] = (
    ("job", lambda j: j.job_id, False),
    ("state", lambda j: j.state if j.queue_position is None else f"{j.state} #{j.queue_position}",
     False),
    ("att", lambda j: str(j.attempt), False),
    ("profile", lambda j: j.profile, True),
    ("team/project", lambda j: f"{j.team}/{j.project}", True),
    ("step", lambda j: f"{j.step}/{j.total_steps}", False),
    ("ckpt", lambda j: str(j.last_checkpoint_step or "-"), False),
    ("pre", lambda j: str(j.preemptions), False),
    ("cost $", lambda j: f"{j.cost_usd:.4f}", False),
    ("reason", lambda j: j.wait_reason or j.reason or "", True),
)
# Left out in this order while the table is wider than the terminal.
DROP_ORDER = ("team/project", "profile", "pre", "ckpt", "att")
REASON_MIN_WIDTH = 20  # below this, the reason folds onto more lines
_GAP = 3  # the borderless box's padding and separator between two columns
_EDGES = 2  # its blank left and right edges


def status_table(jobs: list[JobStatus], width: int) -> Table:
    """Return the status table of `jobs` with the columns that fit in `width` characters.

    NOTE: a terminal narrower than job, state, step and cost together still cuts them.
    """
    cells = {header: [cell(j) for j in jobs] for header, cell, _ in _COLUMNS}
    needed = {header: max([len(header), *map(len, cells[header])]) for header in cells}
    needed["reason"] = min(needed["reason"], REASON_MIN_WIDTH)
    headers = [header for header, _, _ in _COLUMNS]
    for header in DROP_ORDER:
        if sum(needed[h] for h in headers) + _GAP * (len(headers) - 1) + _EDGES <= width:
            break
        headers.remove(header)

    folds = {header: folds for header, _, folds in _COLUMNS}
    columns = [
        Column(h, overflow="fold") if folds[h] else Column(h, no_wrap=True, min_width=needed[h])
        for h in headers
    ]
    table = Table(*columns, box=box.SIMPLE_HEAD, pad_edge=False)
    for row in zip(*(cells[h] for h in headers)):
        table.add_row(*row)
    return table
