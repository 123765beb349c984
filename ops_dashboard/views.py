"""What the dashboard's JSON API answers, built from Redis and the producer's read use cases.

Read-only: nothing here changes state (the actions are in `app.py` and go through
`worker.producer.Producer`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Final

import redis

from worker import keys
from worker.chain_store import ChainStore
from worker.domain import Job
from worker.events import decode_event
from worker.producer import BatchProgress, Producer
from worker.store import decode_job

# The dead-letter list is read this far back (most recent first) for the filters.
DLQ_SCAN: Final = 500
DLQ_LIST_MAX: Final = 200
ERROR_CHARS: Final = 300


def job_view(client: redis.Redis, job_id: str) -> dict[str, Any] | None:
    """A job's record (selected fields), its timeline, its polls and its result event."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.job(job_id))
    pipe.zscore(keys.POLL, job_id)
    pipe.zscore(keys.DLQ, job_id)
    raw, next_look, dead = pipe.execute()
    if not raw or "state" not in raw:
        return None
    job = decode_job(raw, job_id)
    # Bookkeeping on the record that the domain's Job does not carry.
    event_id: str = raw.get("event_id", "")
    # A finished record drops updated_at when it equals finished_at (transition.lua).
    updated_at = _float(raw.get("updated_at") or raw.get("finished_at"))
    event = None
    if event_id:
        entries: Any = client.xrange(keys.EVENTS, event_id, event_id)
        if entries:
            event = decode_event(*entries[0]).to_dict()
    return {
        "job": job_record(job, event_id),
        "timeline": timeline(job, updated_at),
        "polls": {
            "count": job.poll_count,
            # When the poller looks at the job next (a live job only; None once terminal).
            "next_at": None if next_look is None or job.terminal else float(next_look),
            # Only the count is stored on the record, not the time of each poll.
            "times_recorded": False,
        },
        "updated_at": updated_at or None,
        "in_dead_letters": dead is not None,
        "event": event,
        "chain": chain_summary(client, job.chain_id) if job.chain_id else None,
    }


def chain_summary(client: redis.Redis, chain_id: str) -> dict[str, Any] | None:
    """The chain a step job belongs to: its state and every step job written so far."""
    chain = ChainStore(client).get(chain_id)
    if chain is None:
        return None
    pipe = client.pipeline(transaction=False)
    for job_id in chain.job_ids:
        pipe.hmget(keys.job(job_id), "state", "step", "branch")
    rows: list[Any] = pipe.execute()
    return {
        "id": chain.id,
        "state": chain.state,
        "run": chain.run,
        "steps": chain.steps,
        "jobs": [
            {"job_id": job_id, "state": state or "expired", "step": step, "branch": branch}
            for job_id, (state, step, branch) in zip(chain.job_ids, rows, strict=True)
        ],
    }


def job_record(job: Job, event_id: str) -> dict[str, Any]:
    """The job fields the page shows (numbers as numbers); the rest stays server-side."""
    return {
        "id": job.id,
        "state": job.state.value,
        "batch_id": job.batch_id,
        "prediction_id": job.prediction_id,
        "attempts": job.attempts,
        "poll_count": job.poll_count,
        "resolved_by": job.resolved_by,
        "reason": job.reason,
        "error": job.error,
        "task_code": job.task_code,
        "outputs": list(job.outputs),
        "request": dict(job.request),
        "version": job.version,
        "ambiguous": job.ambiguous,
        "idempotency_key": job.idempotency_key,
        "chain_id": job.chain_id,
        "step": job.step or None,
        "branch": job.branch,
        "event_id": event_id,
        "created_at": job.created_at or None,
        "submitting_at": job.submitting_at or None,
        "submitted_at": job.submitted_at or None,
        "finished_at": job.finished_at or None,
    }


def timeline(job: Job, updated_at: float) -> list[dict[str, Any]]:
    """The steps a job went through, oldest first, from the times on its record.

    Polls are not steps here: their times are not recorded (see `job_view`'s `polls`).
    """
    steps: list[tuple[float, str, str]] = [
        (job.created_at, "enqueued", f"batch {job.batch_id or '-'}"),
        (job.submitting_at, "submit started", f"attempt {job.attempts or '?'}"),
        (job.submitted_at, "accepted by WaveSpeed", f"task {job.prediction_id or '-'}"),
    ]
    if job.terminal:
        detail = f"by {job.resolved_by or '-'}"
        if job.reason:
            detail += f"; {job.reason}: {job.error[:ERROR_CHARS]}"
        steps.append((job.finished_at, job.state.value, detail))
    out: list[dict[str, Any]] = [
        {"t": at, "step": what, "detail": detail} for at, what, detail in steps if at > 0
    ]
    if not job.terminal:
        out.append(
            {
                "t": updated_at,
                "step": f"now {job.state.value}",
                "detail": f"polled {job.poll_count} times",
            }
        )
    out.sort(key=lambda s: float(s["t"]))
    return out


def batch_row(progress: BatchProgress) -> dict[str, Any]:
    """A batch's counters, cost, budget, rate and ETA (`BatchProgress.as_dict`)."""
    row = progress.as_dict()
    row["terminal"] = progress.terminal
    row["created_at"] = progress.created_at or None
    return row


def running_batches(producer: Producer, batch_ids: list[str]) -> list[dict[str, Any]]:
    rows = []
    for batch_id in batch_ids:
        progress = producer.batch_progress(batch_id)
        if progress is not None:
            rows.append(batch_row(progress))
    return rows


def dead_letters(
    producer: Producer, *, reason: str = "", batch_id: str = "", limit: int = 50
) -> dict[str, Any]:
    """The most recent failed jobs (up to DLQ_SCAN), filtered by reason and/or batch.

    `reasons` and `batches` count every scanned job (the choices of the page's filters);
    `matching` counts those passing the filters, of which `limit` are listed.
    """
    jobs = producer.dead_letters(limit=DLQ_SCAN)
    total = producer.store.dlq_size()
    matching = [
        j
        for j in jobs
        if (not reason or j.reason == reason) and (not batch_id or j.batch_id == batch_id)
    ]
    return {
        "total": total,
        "scanned": len(jobs),
        "truncated": total > len(jobs),
        "filters": {"reason": reason, "batch_id": batch_id},
        "reasons": _facet(j.reason for j in jobs),
        "batches": _facet(j.batch_id for j in jobs if j.batch_id),
        "matching": len(matching),
        "jobs": [
            {
                "job_id": j.id,
                "time": j.finished_at or None,
                "reason": j.reason,
                "error": j.error[:ERROR_CHARS],
                "batch_id": j.batch_id,
                "task_code": j.task_code,
                "attempts": j.attempts,
            }
            for j in matching[: max(1, min(limit, DLQ_LIST_MAX))]
        ],
    }


def _facet(values: Any) -> list[dict[str, Any]]:
    counts = Counter(values)
    return [{"value": v, "count": n} for v, n in sorted(counts.items(), key=lambda c: c[0])]


def _float(value: str | None) -> float:
    try:
        return float(value or 0)
    except ValueError:
        return 0.0
