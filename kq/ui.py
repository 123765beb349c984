"""Terminal output shared by the `kq` commands: a console and the result table."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from worker.domain import Job

# Logs and CI captures are not terminals; rich would assume 80 columns there.
NON_TTY_WIDTH = 120


def make_console(*, stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else NON_TTY_WIDTH)


def result_table(
    job_ids: Sequence[str], jobs: Sequence[Job | None], saved: Mapping[str, Path] | None = None
) -> Table:
    saved = saved or {}
    table = Table(title="results", show_lines=False)
    table.add_column("job", no_wrap=True)
    table.add_column("edit", overflow="ellipsis", no_wrap=True, max_width=26)
    table.add_column("state", no_wrap=True)
    table.add_column("output / reason", overflow="fold", min_width=24)
    table.add_column("by", no_wrap=True)
    table.add_column("s", justify="right", no_wrap=True)
    colours = {"completed": "green", "failed": "red", "cancelled": "yellow"}
    for job_id, job in zip(job_ids, jobs, strict=True):
        if job is None:
            table.add_row(job_id[:8], "", "missing", "", "", "")
            continue
        state = job.state.value
        if job.id in saved:
            detail = str(saved[job.id])
        elif job.outputs:
            detail = job.outputs[0]
        else:
            detail = f"{job.reason}: {job.error}".strip(": ")
        seconds = job.seconds
        table.add_row(
            job_id[:8],
            str(job.request.get("prompt", "")),
            f"[{colours.get(state, 'white')}]{state}[/]",
            detail,
            job.resolved_by or "-",
            "-" if seconds is None else f"{seconds:.1f}",
        )
    return table
