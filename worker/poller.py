"""The polling fallback: resolve jobs whose webhook never came, and settle ambiguous submits.

A sweep takes only the jobs that are due (`JobStore.claim_due`, which also pushes
each one's next poll back), so its cost follows the due jobs, not all jobs. Every
result goes through `service.apply_update`, the same path the webhook takes.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import structlog

from worker import telemetry
from worker.domain import MODEL, Job, JobState, Prediction, Reason, ResolvedBy
from worker.errors import (
    PermanentError,
    ProviderError,
    QueueUnavailable,
    TransientError,
    ValidationError,
)
from worker.service import (
    Deps,
    adopt_task,
    apply_update,
    best_effort_delete,
    fail_ambiguous,
    fail_job,
    mark_ambiguous,
    note_candidates_final,
    requeue_unsent,
    submit_watchdog_s,
)
from worker.store import QUEUED_CHECK_S

log = structlog.get_logger("kq.poller")

# Polls of one sweep run side by side on the client's connection pool.
POLL_THREADS = 16
# How far around our submit time a task found in the list may have been created.
# A task is created while our POST is in flight: between the submit's start and the
# moment its answer was lost (or, when the worker died, the HTTP timeout). This much is
# added on both sides for clock skew between us and the provider.
RECONCILE_SKEW_S = 10.0
RECONCILE_MAX_PAGES = 20


@dataclass
class SweepReport:
    """What one sweep did, by outcome (for logs, tests and `kq status`)."""

    claimed: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)


def sweep(deps: Deps, pool: ThreadPoolExecutor | None = None) -> SweepReport:
    """Poll every due job once; safe to run from two beats at the same time."""
    settings = deps.settings
    due = deps.store.claim_due(
        deps.clock(),
        limit=settings.sweep_batch,
        min_interval=settings.poll_min_interval_s,
        max_interval=settings.poll_max_interval_s,
    )
    report = SweepReport(claimed=len(due))
    if not due:
        return report
    # Attempts older than any reconciliation still running can no longer matter.
    deps.store.forget_attempts_before(deps.clock() - settings.job_deadline_s - 2 * _overlap_s(deps))
    jobs = [j for j in deps.store.get_many(due) if j is not None]
    if pool is None:
        outcomes = [poll_job(deps, job) for job in jobs]
    else:
        outcomes = list(pool.map(lambda job: poll_job(deps.on_this_thread(), job), jobs))
    report.outcomes.update(outcomes)
    telemetry.count_many(deps.store.redis, {f"poll.{k}": v for k, v in report.outcomes.items()})
    log.info("poll.sweep", claimed=len(due), **dict(report.outcomes))
    return report


def poll_job(deps: Deps, job: Job) -> str:
    """Look at one due job; returns a short outcome label."""
    bound = log.bind(job_id=job.id, prediction_id=job.prediction_id or None)
    try:
        if job.terminal:
            deps.store.unschedule_poll(job.id)
            return "already_terminal"
        if job.state is JobState.SUBMITTED:
            return _poll_submitted(deps, job)
        if job.state is JobState.SUBMITTING:
            if not job.ambiguous:
                if deps.clock() - job.submitting_at < submit_watchdog_s(deps.settings):
                    return "submit_in_progress"
                # The watchdog fired: the worker that claimed this submit is gone.
                bound.warning("poll.stuck_submit")
                marked = mark_ambiguous(
                    deps, job.id, "submit never recorded", expect_version=job.version
                )
                if not marked.applied:
                    return f"stuck_submit_{marked.outcome.value}"
                job = replace(job, ambiguous=True, version=marked.version)
            return reconcile_ambiguous(deps, job)
        if job.state is JobState.QUEUED:
            return _check_queued(deps, job)
        return "not_pollable"
    except ProviderError as exc:
        bound.warning("poll.provider_error", error=str(exc))
        if not job.terminal and _past_deadline(deps, job, deps.clock()):
            # A provider that never answers usably must not keep a job open forever.
            ambiguous = job.state is JobState.SUBMITTING
            reason = Reason.SUBMIT_AMBIGUOUS if ambiguous else Reason.DEADLINE
            fail_job(deps, job.id, reason, f"deadline passed; last error: {exc}", ResolvedBy.POLL)
            return "deadline"
        return "provider_error"


def _check_queued(deps: Deps, job: Job) -> str:
    """A job still queued at its check may have lost its only submit message (kombu pops
    a message before recording it as unacked; a killed worker takes it along, or its
    unsent retry): send another, at most once per check. A spare one is skipped by the
    submit's compare-and-set; a job in the admission line needs none."""
    deps.store.schedule_poll(job.id, deps.clock() + QUEUED_CHECK_S, only_if_scheduled=True)
    if deps.admission is not None and deps.admission.is_waiting(job.id, job.batch_id):
        return "queued_waiting"
    try:
        deps.enqueue_submit(job.id)
    except QueueUnavailable:
        return "resend_failed"  # the broker is away; the next check tries again
    return "resent"


def _poll_submitted(deps: Deps, job: Job) -> str:
    now = deps.clock()
    try:
        prediction = deps.provider.get_result(job.prediction_id)
    except PermanentError as exc:
        # 404: the provider no longer knows the task (deleted, expired after its ~7 days,
        # or lost by a restart). No later poll can bring it back: settle the job now.
        if exc.status_code == 404:
            fail_job(
                deps,
                job.id,
                Reason.TASK_NOT_FOUND,
                f"the provider no longer knows task {job.prediction_id} ({exc})",
                ResolvedBy.POLL,
            )
            return "task_not_found"
        raise
    result = apply_update(deps, job.id, prediction, ResolvedBy.POLL)
    if result is not None:
        return f"resolved_{result.outcome}"
    if _past_deadline(deps, job, now):
        res = fail_job(
            deps,
            job.id,
            Reason.DEADLINE,
            f"no result within {deps.settings.job_deadline_s:.0f} s "
            f"(provider status {prediction.status})",
            ResolvedBy.POLL,
        )
        if res.applied:
            best_effort_delete(deps, job.prediction_id)
        return "deadline"
    return "pending"


def _past_deadline(deps: Deps, job: Job, now: float) -> bool:
    started = job.submitted_at or job.submitting_at or job.created_at
    return now - started > deps.settings.job_deadline_s


def reconcile_ambiguous(deps: Deps, job: Job) -> str:
    """Find out whether an ambiguous submit created a task, without ever paying twice or
    giving a job another job's task (the argument is in the README, "How a job moves").

    List items carry no job identity, so the list is read for tasks created around our
    submit that no job owns, and for the other submits still open around it:
    - no such task once `ambiguous_grace_s` has passed: none was created, send again;
    - exactly one, and no other open submit that could own it: it is ours, adopt it;
    - otherwise only the webhook (our job id in its URL) can tell: wait for it, and fail
      `submit_ambiguous` once every candidate task has been finished for
      `ambiguous_settle_s` (the provider's webhook retries are over by then), naming
      the candidates. A job past its deadline fails the same way.
    """
    candidates = _unowned_candidates(deps, job)
    others = _other_open_attempts(deps, job)
    # After the list calls: a task seen finished in their answer finished before now.
    now = deps.clock()
    ids = [c.id for c in candidates]
    if len(candidates) == 1 and not others:
        return f"adopted_{adopt_task(deps, job, candidates[0]).outcome.value}"
    if not candidates:
        if now - job.submitting_at > deps.settings.ambiguous_grace_s:
            return f"requeued_{requeue_unsent(deps, job).outcome.value}"
    elif all(c.final for c in candidates):
        # The wait for a webhook naming the job runs from when the last of the current
        # candidates was first seen finished: one that appears later restarts it, one
        # that another job took (its webhook came) no longer counts.
        seen = dict(job.candidates_seen)
        current = {i: seen.get(i, now) for i in ids}
        if current != seen:
            note_candidates_final(deps, job, current)
        if now - max(current.values()) >= deps.settings.ambiguous_settle_s:
            why = f"{len(candidates)} unowned tasks and {len(others)} other open submits"
            fail_ambiguous(deps, job, ids, why + " around it; no webhook named the job")
            return "ambiguous_failed"
    if _past_deadline(deps, job, now):
        fail_ambiguous(deps, job, ids, f"no attribution within the job deadline ({len(ids)} tasks)")
        return "ambiguous_failed"
    return "ambiguous_waiting"


def _other_open_attempts(deps: Deps, job: Job) -> list[str]:
    """Open submit attempts, other than this job's current one, whose task could fall in
    this job's list window."""
    own = f"{job.id}:{job.attempts}"
    overlap = _overlap_s(deps)
    around = deps.store.open_attempts(job.submitting_at - overlap, job.submitting_at + overlap)
    return [member for member, _ in around if member != own]


def _overlap_s(deps: Deps) -> float:
    """Two submits that began this close may have tasks in each other's windows (the
    widest window: a POST that ran to the HTTP timeout, plus the skew on both sides)."""
    return submit_watchdog_s(deps.settings) + 2 * RECONCILE_SKEW_S


def _window(deps: Deps, job: Job) -> tuple[float, float]:
    """When the task of this job's last submit, if any, can have been created."""
    end = job.answer_lost_at or job.submitting_at + submit_watchdog_s(deps.settings)
    return job.submitting_at - RECONCILE_SKEW_S, end + RECONCILE_SKEW_S


def _unowned_candidates(deps: Deps, job: Job) -> list[Prediction]:
    start, end = _window(deps, job)
    after, before = _iso(start), _iso(end)
    found: list[Prediction] = []
    for page in range(1, RECONCILE_MAX_PAGES + 1):
        items = deps.provider.list_predictions(
            # Only the job's own model's tasks can be its task (no `model`: Kontext [max]).
            model=job.request.get("model", MODEL),
            created_after=after,
            created_before=before,
            page=page,
            page_size=100,
        )
        for item in items:
            if not _matches_request(item, job):
                continue
            try:
                prediction = Prediction.from_json(item)
            except ValidationError:
                continue
            owner = deps.store.job_for_prediction(prediction.id)
            if owner is None or owner == job.id:
                found.append(prediction)
        if len(items) < 100:
            break
    else:
        # Every page was full: our task may be in the part not read, so neither "none"
        # nor "exactly one" would be true. Look again later; the deadline still applies.
        raise TransientError(f"list: over {RECONCILE_MAX_PAGES * 100} tasks in the window")
    return found


def _matches_request(item: Any, job: Job) -> bool:
    """Use the task's echoed input when the provider includes it; otherwise accept."""
    echoed = item.get("input") if hasattr(item, "get") else None
    if not isinstance(echoed, dict):
        return True
    return all(echoed.get(name) == job.request.get(name) for name in ("prompt", "image", "images"))


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
