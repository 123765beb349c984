"""Terminal output of the producer commands: jobs, batch progress and results, `--json`.

With `--json`, stdout carries only JSON and human notes go to stderr.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kq.ui import make_console, result_table
from worker.domain import Job, JobState
from worker.outputs import OutputsRecord
from worker.producer import BatchProgress, Producer, job_json

# A finished batch up to this size is listed job by job; larger ones by outcome.
MAX_ROWS_LISTED = 50

# Exit codes of the commands that wait for results (`kq wait`, `kq batch --wait`,
# `kq enqueue --wait`), so a script or CI job can tell the outcomes apart.
EXIT_COMPLETED = 0  # every job completed
EXIT_NOT_DONE = 1  # unknown id, or the timeout passed before every job was done
EXIT_INVALID = 2  # bad input or settings: nothing was enqueued
EXIT_JOBS_FAILED = 3  # all done, but some jobs failed or were cancelled
WAIT_EXIT_CODES = f"""exit codes:
  {EXIT_COMPLETED}  every job completed
  {EXIT_NOT_DONE}  unknown id, or --timeout passed before every job was done
  {EXIT_INVALID}  invalid input or settings (nothing was enqueued)
  {EXIT_JOBS_FAILED}  every job is done, but some failed or were cancelled"""


def batch_exit_code(progress: BatchProgress | None) -> int:
    """What a command that waited for a batch exits with (see WAIT_EXIT_CODES)."""
    if progress is None or not progress.done:
        return EXIT_NOT_DONE
    return EXIT_JOBS_FAILED if progress.failed or progress.cancelled else EXIT_COMPLETED


def job_exit_code(job: Job | None) -> int:
    """What a command that waited for one job exits with (see WAIT_EXIT_CODES)."""
    if job is None or not job.terminal:
        return EXIT_NOT_DONE
    return EXIT_COMPLETED if job.state is JobState.COMPLETED else EXIT_JOBS_FAILED


def console_for(as_json: bool) -> Console:
    # With --json, stdout carries only JSON; human notes go to stderr.
    return make_console(stderr=as_json)


def print_json(data: object) -> None:
    print(json.dumps(data, default=str))


def job_dict(job: Job) -> dict[str, Any]:
    """The job as `--json` prints it: the same JSON as the HTTP API's (numbers as
    numbers, unknown times as null)."""
    return job_json(job)


def show_job(
    job: Job | None, job_id: str, *, as_json: bool, kept: OutputsRecord | None = None
) -> int:
    """Print one job; `kept`: its copy-out, when its outputs are kept (shown beside the
    provider's `outputs`: `outputs_state`, and each copy's durable URI)."""
    if job is None:
        print(f"kq: no job {job_id!r} (unknown, or expired)", file=sys.stderr)
        return 1
    data = _with_copies(job_dict(job), kept)
    if as_json:
        print_json(data)
        return 0
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in data.items():
        if key == "stored_outputs":
            value = "\n".join(f"{c['uri']} ({c['size']} bytes, {c['content_type']})" for c in value)
        elif key in ("request", "metadata") and value is not None:
            value = json.dumps(value, ensure_ascii=False)
        elif key.endswith("_at") and value:
            value = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(value)))
        table.add_row(key, "" if value in (None, "", ()) else str(value))
    make_console().print(table)
    return 0


def _with_copies(data: dict[str, Any], kept: OutputsRecord | None) -> dict[str, Any]:
    """The job's dict with its copy-out's fields right after the provider's `outputs`."""
    if kept is None:
        return data
    out: dict[str, Any] = {}
    for key, value in data.items():
        out[key] = value
        if key == "outputs":
            out.update(kept.to_json())
    if "outputs_state" not in out:
        out.update(kept.to_json())
    return out


def wait_batch_live(
    console: Console, producer: Producer, batch_id: str, timeout_s: float
) -> BatchProgress | None:
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("edits", total=None, detail="")

        def show(p: BatchProgress) -> None:
            eta = p.eta_s
            bar.update(
                task,
                total=p.total,
                completed=p.terminal,
                detail=(
                    f"{p.completed} ok, {p.failed} failed, {p.cancelled} cancelled, "
                    f"{p.in_flight} at provider, {p.queued} queued · ${p.cost_usd:.2f}"
                    + (f" · ETA {eta:.0f}s" if eta else "")
                ),
            )

        return producer.wait_batch(batch_id, timeout_s=timeout_s, on_progress=show)


def print_batch_result(
    console: Console, producer: Producer, batch_id: str, progress: BatchProgress | None
) -> None:
    if progress is None:
        console.print(f"no batch {batch_id!r}")
        return
    if progress.total <= MAX_ROWS_LISTED:
        jobs = producer.batch_jobs(batch_id, limit=MAX_ROWS_LISTED)
        console.print(result_table([j.id for j in jobs], jobs))
    else:
        console.print(_outcome_table(producer, batch_id))
    console.print(progress_table(progress))


def _outcome_table(producer: Producer, batch_id: str) -> Table:
    """A large batch, summarised by state and reason."""
    counts: dict[tuple[str, str], int] = {}
    offset = 0
    while jobs := producer.batch_jobs(batch_id, offset=offset, limit=1000):
        for job in jobs:
            key = (job.state.value, job.reason)
            counts[key] = counts.get(key, 0) + 1
        offset += len(jobs)
    table = Table(title=f"batch {batch_id} by outcome")
    table.add_column("state")
    table.add_column("reason")
    table.add_column("jobs", justify="right")
    for (state, reason), n in sorted(counts.items(), key=lambda kv: -kv[1]):
        table.add_row(state, reason or "-", str(n))
    return table


def progress_table(p: BatchProgress) -> Table:
    table = Table(title=f"batch {p.batch_id}")
    for name in ("total", "queued", "in flight", "completed", "failed", "cancelled", "cost"):
        table.add_column(name, justify="right")
    table.add_row(
        str(p.total),
        str(p.queued),
        str(p.in_flight),
        str(p.completed),
        str(p.failed),
        str(p.cancelled),
        f"${p.cost_usd:.2f}" + (f" of ${p.budget_usd:.2f}" if p.budget_usd is not None else ""),
    )
    return table
