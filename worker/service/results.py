"""Use cases that settle a job: record its task, apply a result, fail it, cancel it."""

from __future__ import annotations

import json

import structlog

from worker.domain import JobState, Prediction, Reason, ResolvedBy, outcome_of
from worker.errors import ProviderError
from worker.service.deps import Deps
from worker.store import REMOVE, TransitionResult

log = structlog.get_logger("kq.service")


def record_submitted(deps: Deps, job_id: str, prediction_id: str) -> TransitionResult:
    """submitting -> submitted with the provider's id; polled later if no webhook comes."""
    now = deps.clock()
    return deps.store.transition(
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
    result = deps.store.transition(
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
    log.info(
        "job.update",
        job_id=job_id,
        prediction_id=prediction.id,
        status=prediction.status,
        resolved_by=resolved_by.value,
        outcome=result.outcome.value,
        state=result.state,
    )
    return result


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
    return deps.store.transition(
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
    result = deps.store.transition(
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
    log.info("job.cancel", job_id=job_id, outcome=result.outcome.value, state=result.state)
    return result


def best_effort_delete(deps: Deps, prediction_id: str) -> None:
    try:
        deps.provider.delete([prediction_id])
    except ProviderError as exc:
        log.info("provider.delete_failed", prediction_id=prediction_id, error=str(exc))
