"""Use cases that settle a job: record its task, apply a result, fail it, cancel it."""

from __future__ import annotations

import json
from dataclasses import dataclass

import structlog

from worker.domain import (
    JobState,
    Prediction,
    Reason,
    ResolvedBy,
    TransitionOutcome,
    outcome_of,
)
from worker.errors import ProviderError
from worker.service.deps import Deps
from worker.store import REMOVE, TransitionResult

log = structlog.get_logger("kq.service")


def record_submitted(deps: Deps, job_id: str, prediction_id: str) -> TransitionResult:
    """submitting -> submitted with the provider's id; polled later if no webhook comes."""
    now = deps.clock()
    return deps.transition(
        job_id,
        JobState.SUBMITTED,
        now=now,
        fields={"prediction_id": prediction_id, "submitted_at": now, "ambiguous": "0"},
        expect_prediction_id=prediction_id,
        poll_at=now + deps.settings.poll_after_s,
    )


def apply_update(
    deps: Deps,
    job_id: str,
    prediction: Prediction,
    resolved_by: ResolvedBy,
    *,
    webhook_id: str = "",
) -> TransitionResult | None:
    """Apply a provider result to a job; None while the prediction is not final.

    Duplicates, late and contradictory results come back as `rejected` (the job is
    already terminal) and change nothing; a result for another prediction id comes
    back as `mismatch`. With `webhook_id`, the delivery is marked as seen in the same
    atomic step, and one seen before comes back `duplicate`.
    """
    outcome = outcome_of(prediction)
    if outcome is None:
        return None
    now = deps.clock()
    result = deps.transition(
        job_id,
        outcome.state,
        now=now,
        fields={
            "prediction_id": prediction.id,
            "finished_at": now,
            "resolved_by": resolved_by.value,
            "outputs": json.dumps(list(outcome.outputs)),
            "error": outcome.error,
            "reason": outcome.reason,
            "task_code": "" if prediction.task_code is None else prediction.task_code,
            "ambiguous": "0",
        },
        expect_prediction_id=prediction.id,
        poll_at=REMOVE,
        webhook_id=webhook_id,
    )
    # A result applied by webhook is the hot path (thousands a second in a storm) and is
    # on record twice already: the job's event in the stream and the receiver's outcome
    # counters. Its line is DEBUG; a poll's result (a webhook went missing) and every
    # delivery that changed nothing stay INFO.
    quiet = result.applied and resolved_by is ResolvedBy.WEBHOOK
    (log.debug if quiet else log.info)(
        "job.update",
        job_id=job_id,
        prediction_id=prediction.id,
        status=prediction.status,
        resolved_by=resolved_by.value,
        outcome=result.outcome.value,
        state=result.state,
    )
    return result


@dataclass(frozen=True)
class Verifying:
    """A failure reported by webhook, left for the provider's GET to confirm: the job was
    put on the poll schedule for now (and, if its submit was ambiguous, given the task
    the webhook names)."""

    state: str


def apply_webhook(
    deps: Deps, job_id: str, prediction: Prediction, webhook_id: str
) -> TransitionResult | Verifying | None:
    """Apply a webhook delivery (its URL named the job, its signature was checked).

    A completed task is applied at once, marked seen with its `webhook_id` in the same
    step. A reported failure is not taken on its word: deliveries are retried, late and
    out of order, and a "failed" sent after the task completed must not end a job whose
    "completed" was lost. The job is polled at once instead, and the result the GET
    answers (the provider's canonical view) ends it; such a delivery is not marked seen,
    so a retry of it only asks for the same poll again.
    """
    outcome = outcome_of(prediction)
    if outcome is None or outcome.state is not JobState.FAILED:
        return apply_update(deps, job_id, prediction, ResolvedBy.WEBHOOK, webhook_id=webhook_id)
    job = deps.store.get(job_id)
    if job is not None and deps.store.webhook_seen(webhook_id):
        # A replay of a delivery applied before (any body): nothing to confirm.
        return TransitionResult(TransitionOutcome.DUPLICATE, job.state.value, job.version)
    if job is None or job.terminal or job.prediction_id not in ("", prediction.id):
        # Nothing to confirm: unknown job, stale or another task's news; answered so.
        return apply_update(deps, job_id, prediction, ResolvedBy.WEBHOOK, webhook_id=webhook_id)
    now = deps.clock()
    if job.prediction_id:
        deps.store.schedule_poll(job_id, now, only_if_scheduled=True)
        return Verifying(job.state.value)
    # An ambiguous (or not yet recorded) submit: the URL says whose task this is.
    recorded = deps.transition(
        job_id,
        JobState.SUBMITTED,
        now=now,
        fields={"prediction_id": prediction.id, "submitted_at": now, "ambiguous": "0"},
        expect_prediction_id=prediction.id,
        poll_at=now,
    )
    if recorded.outcome is TransitionOutcome.MISMATCH:
        return recorded
    if not recorded.applied:
        deps.store.schedule_poll(job_id, now, only_if_scheduled=True)
    log.info("job.failure_to_verify", job_id=job_id, prediction_id=prediction.id)
    return Verifying(recorded.state)


def fail_job(
    deps: Deps,
    job_id: str,
    reason: Reason,
    error: str,
    resolved_by: ResolvedBy = ResolvedBy.WORKER,
    *,
    created_no_task: bool = False,
    extra: dict[str, str] | None = None,
) -> TransitionResult:
    """Move a non-terminal job to failed with a reason code.

    `created_no_task`: the submit attempt being left is known to have created no task.
    """
    now = deps.clock()
    return deps.transition(
        job_id,
        JobState.FAILED,
        now=now,
        fields={
            "finished_at": now,
            "reason": reason.value,
            "error": error,
            "resolved_by": resolved_by.value,
            "ambiguous": "0",
            **(extra or {}),
        },
        poll_at=REMOVE,
        attempt_created_no_task=created_no_task,
    )


def cancel_job(deps: Deps, job_id: str) -> TransitionResult:
    """Cancel a job that is not terminal; a submitted one is also deleted at the provider.

    A queued job is then never submitted (the submit sees a terminal job); a late
    webhook for a cancelled job is answered `stale` and changes nothing. The task to
    delete is read after the move: once cancelled, no prediction id can be recorded,
    so the one found then is the job's last word (a submit racing the cancel deletes
    its own task when its record is refused; see submit.py).
    """
    now = deps.clock()
    result = deps.transition(
        job_id,
        JobState.CANCELLED,
        now=now,
        fields={
            "finished_at": now,
            "reason": Reason.CANCELLED_BY_USER.value,
            "resolved_by": ResolvedBy.USER.value,
            "ambiguous": "0",
        },
        poll_at=REMOVE,
    )
    if result.applied:
        job = deps.store.get(job_id)
        if job is not None and job.prediction_id:
            best_effort_delete(deps, job.prediction_id)
    # DEBUG: a batch cancel would print a line per job; its event and the caller say it.
    log.debug("job.cancel", job_id=job_id, outcome=result.outcome.value, state=result.state)
    return result


def best_effort_delete(deps: Deps, prediction_id: str) -> None:
    try:
        deps.provider.delete([prediction_id])
    except ProviderError as exc:
        log.info("provider.delete_failed", prediction_id=prediction_id, error=str(exc))
