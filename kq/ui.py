"""Terminal output shared by the `kq` commands: a console, the result table, `kq status`."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from worker.domain import Job
from worker.snapshot import (
    POLL_QUEUE,
    ROLES,
    SUBMIT_QUEUE,
    Failure,
    OverdueJob,
    Severity,
    StatusSnapshot,
)

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
            (f"{job.step}> " if job.chain_id else "") + str(job.request.get("prompt", "")),
            f"[{colours.get(state, 'white')}]{state}[/]",
            detail,
            job.resolved_by or "-",
            "-" if seconds is None else f"{seconds:.1f}",
        )
    return table


# --- kq status ----------------------------------------------------------------------------


def render_status(snap: StatusSnapshot) -> RenderableType:
    """A status snapshot as rich tables (for `kq status` and `--watch`)."""
    when = datetime.fromtimestamp(snap.time, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    head = Text.assemble(("kontext-queue status", "bold"), f"  {when}")

    jobs = snap.jobs
    overview = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for name in ("queued", "submitting", "in flight", "completed", "failed", "cancelled"):
        overview.add_column(name, justify="right")
    overview.add_row(
        str(jobs.queued),
        str(jobs.submitting),
        str(jobs.submitted),
        Text(str(jobs.completed), style="green"),
        Text(str(jobs.failed), style="red" if jobs.failed else ""),
        str(jobs.cancelled),
    )

    res, lat, recent, cost = snap.resolution, snap.latency, snap.recent, snap.cost
    q, p = snap.queues, snap.polling
    facts = Table(show_header=False, box=None, pad_edge=False)
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row(
        "celery queues",
        f"{SUBMIT_QUEUE} {q.submit}  {POLL_QUEUE} {q.poll}  reserved by workers {q.reserved}",
    )
    adm = snap.admission
    if adm:
        backoff = max(0.0, adm.backoff_until - snap.time)
        facts.add_row(
            "provider slots",
            f"{adm.slots_used}/{adm.slots_total} in use, {adm.waiting} waiting; "
            f"submits last minute {adm.submits_last_minute}/{adm.submits_per_minute_limit}"
            f" (rate x{adm.rate_factor:.1f}"
            + (f", paused {backoff:.0f}s after a 429" if backoff else "")
            + f"; 429s so far {adm.rate_limited_total})",
        )
    finished = f" (and {p.finished} ended, dropped when due)" if p.finished else ""
    facts.add_row(
        "polling",
        f"{p.due} due now, {p.scheduled} scheduled{finished}; "
        f"{snap.overdue.count} overdue; dead letters {snap.dlq}",
    )
    facts.add_row(
        "resolved by",
        f"webhook {res.webhook}  poll {res.poll}  worker {res.worker}  "
        f"user {res.user}; missed-webhook rate {_pct(res.missed_webhook_rate)} "
        f"(last {recent.window_min} min: {_pct(res.window.missed_webhook_rate)})",
    )
    facts.add_row(
        "latency",
        f"p50 {_secs(lat.p50_s)}  p95 {_secs(lat.p95_s)}  "
        f"over {lat.count} results in {recent.window_min} min",
    )
    webhooks = ", ".join(f"{k} {v}" for k, v in recent.webhooks.items()) or "none"
    facts.add_row(
        f"last {recent.window_min} min",
        f"submitted {recent.submitted}, retries {recent.submit_retries} "
        f"(429s {recent.rate_limited_429}), ambiguous {recent.ambiguous}, "
        f"polls {recent.polls}; webhooks: {webhooks}",
    )
    batches = "  ".join(
        f"{b.batch_id} {b.terminal}/{b.total} ${b.cost_usd:.2f}" for b in cost.running_batches
    )
    facts.add_row(
        "cost",
        f"${cost.total_usd:.2f} in all ({cost.paid_jobs} paid tasks), "
        f"${cost.today_usd:.2f} today" + (f"; running: {batches}" if batches else ""),
    )
    beats = snap.heartbeats
    facts.add_row(
        "processes",
        "  ".join(
            f"{role} {len(beats.of(role))}" + (" ✓" if beats.of(role) else " ✗") for role in ROLES
        ),
    )

    parts: list[RenderableType] = [head, overview, Text(""), facts]
    if snap.alarms:
        parts.append(Text(""))
        for a in snap.alarms:
            style = "bold red" if a.severity == Severity.CRITICAL else "bold yellow"
            parts.append(Text.assemble((f"ALARM {a.name.value}", style), f": {a.message}"))
    if snap.overdue.jobs:
        parts.append(_overdue_table(snap.overdue.jobs))
    if snap.failures:
        parts.append(_failures_table(snap.failures[:5]))
    return Group(*parts)


def _jobs_table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", box=None, header_style="bold")
    table.add_column("job")
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _overdue_table(jobs: Sequence[OverdueJob]) -> Table:
    table = _jobs_table("overdue", "state", "age")
    for job in jobs:
        table.add_row(job.job_id, job.state.value, _secs(job.age_s))
    return table


def _failures_table(failures: Sequence[Failure]) -> Table:
    table = _jobs_table("recent failures", "reason", "error")
    for failure in failures:
        # Text, not markup: provider error strings may hold square brackets.
        table.add_row(failure.job_id, Text(failure.reason), Text(failure.error))
    return table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _secs(value: float | None) -> str:
    """A duration for people: tenths under 10 s, then whole seconds, minutes, hours."""
    if value is None:
        return "-"
    if value < 9.95:
        return f"{max(0.0, value):.1f} s"
    seconds = round(value)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    minutes = round(value / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min"
