"""Use cases for a submit whose answer was lost: flag it, then settle it exactly one way.

A lost answer (timeout, dropped connection, a worker killed mid-POST) leaves the job in
`submitting` with `ambiguous=1`: a task may exist and be billed. It is settled by the
webhook that names the job (see results.apply_update), or by the poller's reading of
the provider's list (poller.reconcile_ambiguous), through the moves below. None of them
ever sends the job again unless no task can exist.
"""

from __future__ import annotations

import structlog

from worker.domain import Job, JobState, Prediction, Reason, ResolvedBy
from worker.service.deps import Deps
from worker.service.results import apply_update, fail_job, record_submitted
from worker.store import QUEUED_CHECK_S, TransitionResult

log = structlog.get_logger("kq.service")

# After an ambiguous submit, look for the task in the provider's list this soon
# (a webhook carrying our job id may settle it before then).
AMBIGUOUS_FIRST_CHECK_S = 10.0


def mark_ambiguous(
    deps: Deps,
    job_id: str,
    error: str,
    *,
    expect_version: int | None = None,
    answer_lost: bool = False,
) -> TransitionResult:
    """Flag a `submitting` job whose submit may have created a task, and schedule its
    reconciliation. One compare-and-set: a job that moved on (a webhook completed it,
    a user cancelled it) is left alone. `answer_lost`: the caller is the submit that just
    lost its answer, so any task of it was created before now (narrows the list window)."""
    now = deps.clock()
    delay = min(AMBIGUOUS_FIRST_CHECK_S, deps.settings.poll_after_s)
    fields: dict[str, str | float] = {"ambiguous": "1", "error": error}
    if answer_lost:
        fields["answer_lost_at"] = now
    result = deps.store.flag(
        job_id,
        JobState.SUBMITTING,
        fields,
        now=now,
        expect_version=expect_version,
        poll_at=now + delay,
    )
    log.warning("submit.marked_ambiguous", job_id=job_id, outcome=result.outcome.value)
    return result


def note_candidates_final(deps: Deps, job: Job, seen: dict[str, float]) -> TransitionResult:
    """Remember when each task that could be this job's was first seen finished (the
    provider has sent its webhooks by then), so the wait for ours is bounded from it."""
    return deps.store.flag(
        job.id,
        JobState.SUBMITTING,
        {
            "candidates": ",".join(sorted(seen)),
            "candidates_seen": ",".join(f"{i}@{t:.3f}" for i, t in sorted(seen.items())),
            "candidates_final_at": max(seen.values()),
        },
        now=deps.clock(),
        expect_version=job.version,
    )


def adopt_task(deps: Deps, job: Job, prediction: Prediction) -> TransitionResult:
    """Give an ambiguous job the task that reconciliation proved to be its own."""
    recorded = record_submitted(deps, job.id, prediction.id)
    if prediction.final:
        apply_update(deps, job.id, prediction, ResolvedBy.POLL)
    if recorded.applied:
        log.warning("reconcile.adopted", job_id=job.id, prediction_id=prediction.id)
    return recorded


def requeue_unsent(deps: Deps, job: Job) -> TransitionResult:
    """Send again a job whose ambiguous submit is proven to have created no task."""
    now = deps.clock()
    requeued = deps.store.transition(
        job.id,
        JobState.QUEUED,
        now=now,
        fields={
            "ambiguous": "0",
            "candidates_final_at": 0,
            "candidates": "",
            "candidates_seen": "",
            "answer_lost_at": 0,
        },
        expect_version=job.version,
        poll_at=now + QUEUED_CHECK_S,
        attempt_created_no_task=True,
    )
    if requeued.applied:
        deps.enqueue_submit(job.id)
        log.warning("reconcile.requeued", job_id=job.id)
    return requeued


def fail_ambiguous(deps: Deps, job: Job, candidates: list[str], why: str) -> TransitionResult:
    """Give up on attributing a task: fail `submit_ambiguous`, naming the tasks that could
    have been this job's (one of them may be paid for; none is sent again)."""
    listed = ",".join(candidates)
    return fail_job(
        deps,
        job.id,
        Reason.SUBMIT_AMBIGUOUS,
        f"submit answer lost; {why}; candidate tasks: {listed or 'none'}; "
        "not resubmitted to avoid paying twice",
        ResolvedBy.POLL,
        extra={"candidates": listed},
    )
