"""The use cases every entry point goes through: submit a job, apply a provider result.

Adapters (store, provider client, clock) are handed in as `Deps`; this module never
builds a connection. Each state change is one `JobStore.transition` call.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import structlog

from worker import telemetry
from worker.admission import Admission
from worker.domain import (
    PRICE_PER_IMAGE_MICROS,
    EditRequest,
    JobState,
    Prediction,
    Reason,
    ResolvedBy,
    outcome_of,
)
from worker.errors import (
    AmbiguousError,
    PermanentError,
    ProviderError,
    RateLimited,
    TransientError,
    ValidationError,
)
from worker.settings import Settings
from worker.signing import webhook_url
from worker.store import QUEUED_CHECK_S, REMOVE, JobStore, TransitionResult
from worker.wavespeed import WaveSpeedClient

log = structlog.get_logger("kq.service")

# After an ambiguous submit, look for the task in the provider's list this soon
# (a webhook carrying our job id may settle it before then).
AMBIGUOUS_FIRST_CHECK_S = 10.0
# Added to the HTTP timeout: a submit older than that has no live worker behind it.
SUBMIT_WATCHDOG_MARGIN_S = 10.0


@dataclass
class Deps:
    """The adapters a use case needs, built by the entry point that calls it."""

    store: JobStore
    provider: WaveSpeedClient
    settings: Settings
    clock: Callable[[], float] = field(default=time.time)
    # Puts a job id back on the submit queue (the Celery side hands this in).
    enqueue_submit: Callable[[str], None] = field(default=lambda job_id: None)
    # Account-wide limits shared through Redis; None: no admission control.
    admission: Admission | None = None


class SubmitOutcome(StrEnum):
    SUBMITTED = "submitted"
    RETRY = "retry"
    FAILED = "failed"
    AMBIGUOUS = "ambiguous"
    SKIPPED = "skipped"
    WAITING = "waiting"  # no provider slot free: the job waits in Redis (admission)


# Outcomes after which no task exists at the provider for this attempt.
_NO_TASK_OUTCOMES = frozenset(
    {SubmitOutcome.RETRY, SubmitOutcome.FAILED, SubmitOutcome.SKIPPED, SubmitOutcome.WAITING}
)


@dataclass(frozen=True)
class SubmitResult:
    outcome: SubmitOutcome
    detail: str = ""


def submit_job(
    deps: Deps, job_id: str, *, final_attempt: bool = False, slot_held: bool = False
) -> SubmitResult:
    """Submit one queued job to WaveSpeed, at most once per paid task.

    Safe under redelivery: a job that has a prediction id, is terminal, or was left
    in `submitting` by a crashed worker is never POSTed again from here (the last
    case is handed to reconciliation as an ambiguous submit).

    With admission control, the job first needs a provider slot; without one it waits
    in Redis (WAITING) until a dispatcher claims it and calls again with `slot_held`.
    A slot this call owns is given back on every path that did not reach the provider.
    """
    owns_slot = [slot_held]
    result = _submit(deps, job_id, final_attempt=final_attempt, owns_slot=owns_slot)
    if owns_slot[0] and deps.admission is not None and result.outcome in _NO_TASK_OUTCOMES:
        deps.admission.release(job_id)
    return result


def _submit(deps: Deps, job_id: str, *, final_attempt: bool, owns_slot: list[bool]) -> SubmitResult:
    store, settings = deps.store, deps.settings
    bound = log.bind(job_id=job_id)
    job = store.get(job_id)
    if job is None:
        bound.warning("submit.unknown_job")
        return SubmitResult(SubmitOutcome.SKIPPED, "no such job")
    bound = bound.bind(batch_id=job.batch_id or None)
    if job.terminal or job.prediction_id or job.state is JobState.SUBMITTED:
        bound.info("submit.skipped", state=job.state.value)
        return SubmitResult(SubmitOutcome.SKIPPED, f"job is {job.state.value}")
    now = deps.clock()
    if job.state is JobState.SUBMITTING:
        if now - job.submitting_at < submit_watchdog_s(settings):
            # Another attempt (a duplicate message) is posting right now.
            bound.info("submit.in_flight_elsewhere")
            return SubmitResult(SubmitOutcome.SKIPPED, "another attempt is in flight")
        # A previous attempt died between its POST and recording the answer.
        _mark_ambiguous(deps, job_id, "redelivered while submitting")
        bound.warning("submit.redelivered_in_flight")
        return SubmitResult(SubmitOutcome.AMBIGUOUS, "previous attempt may have created a task")

    try:
        request = EditRequest.from_dict(job.request)
    except ValidationError as exc:
        # Only a record written around the producer's checks gets here.
        _fail(deps, job_id, Reason.INVALID_REQUEST, str(exc))
        bound.error("submit.invalid_request", error=str(exc))
        return SubmitResult(SubmitOutcome.FAILED, str(exc))
    if not store.reserve_budget(job_id, job.batch_id, PRICE_PER_IMAGE_MICROS):
        _fail(deps, job_id, Reason.BUDGET, "the batch budget would be exceeded by this image")
        bound.warning("submit.over_budget")
        return SubmitResult(SubmitOutcome.FAILED, "over budget")
    if deps.admission is not None and not owns_slot[0]:
        decision = deps.admission.acquire(job_id, job.batch_id, job.priority, now)
        if not decision.granted:
            return SubmitResult(SubmitOutcome.WAITING, f"{decision.retry_after_s:.2f}")
        if decision.held_already:
            # Another attempt of this job (a dispatcher's claim) holds the slot: its turn.
            bound.info("submit.slot_held_elsewhere")
            return SubmitResult(SubmitOutcome.SKIPPED, "another attempt holds the slot")
        owns_slot[0] = True

    claim = store.transition(
        job_id,
        JobState.SUBMITTING,
        now=now,
        fields={"attempts": job.attempts + 1, "submitting_at": now},
        expect_version=job.version,
        # A watchdog: if this worker dies mid-submit, the poller looks at the job then.
        poll_at=now + submit_watchdog_s(settings),
    )
    if not claim.applied:
        bound.info("submit.lost_race", outcome=claim.outcome, state=claim.state)
        return SubmitResult(SubmitOutcome.SKIPPED, f"job moved to {claim.state}")

    hook = (
        webhook_url(settings.webhook_public_url, settings.secret_key, job_id)
        if settings.webhooks_enabled
        else None
    )
    try:
        prediction = deps.provider.submit(request, webhook_url=hook)
    except AmbiguousError as exc:
        _mark_ambiguous(deps, job_id, str(exc))
        bound.warning("submit.ambiguous", error=str(exc))
        telemetry.count(store.redis, "submit.ambiguous")
        return SubmitResult(SubmitOutcome.AMBIGUOUS, str(exc))
    except TransientError as exc:
        if final_attempt:
            _fail(deps, job_id, Reason.SUBMIT_RETRIES_EXHAUSTED, str(exc))
            bound.error("submit.retries_exhausted", error=str(exc))
            telemetry.count(store.redis, "submit.exhausted")
            return SubmitResult(SubmitOutcome.FAILED, str(exc))
        store.transition(
            job_id,
            JobState.QUEUED,
            now=deps.clock(),
            expect_version=claim.version,
            # Checked later in case the retry message is lost (see poller.poll_job).
            poll_at=deps.clock() + QUEUED_CHECK_S,
        )
        bound.info("submit.transient_error", error=str(exc), status=exc.status_code)
        if isinstance(exc, RateLimited) and deps.admission is not None:
            # Everyone slows down, and this job waits its turn again (no Celery retry).
            deps.admission.penalize(deps.clock())
            deps.admission.wait(job_id, job.batch_id, job.priority, deps.clock())
            owns_slot[0] = False
            telemetry.count_many(store.redis, {"submit.retry": 1, "submit.rate_limited": 1})
            return SubmitResult(SubmitOutcome.WAITING, str(exc))
        telemetry.count_many(
            store.redis, {"submit.retry": 1, "submit.rate_limited": int(exc.status_code == 429)}
        )
        return SubmitResult(SubmitOutcome.RETRY, str(exc))
    except PermanentError as exc:
        _fail(deps, job_id, Reason.SUBMIT_REJECTED, str(exc))
        bound.error("submit.rejected", error=str(exc), status=exc.status_code)
        telemetry.count(store.redis, "submit.rejected")
        return SubmitResult(SubmitOutcome.FAILED, str(exc))

    bound = bound.bind(prediction_id=prediction.id)
    recorded = record_submitted(deps, job_id, prediction.id)
    bound.info("submit.ok", recorded=recorded.outcome)
    telemetry.count(store.redis, "submit.submitted")
    if recorded.outcome == "rejected" and recorded.state == JobState.CANCELLED.value:
        # Cancelled while our POST was in flight: the task exists, so drop it.
        best_effort_delete(deps, prediction.id)
    if prediction.final:
        apply_update(deps, job_id, prediction, ResolvedBy.WORKER)
    return SubmitResult(SubmitOutcome.SUBMITTED, prediction.id)


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
    deps: Deps, job_id: str, prediction: Prediction, resolved_by: ResolvedBy
) -> TransitionResult | None:
    """Apply a provider result to a job; None while the prediction is not final.

    Duplicates, late and contradictory results come back as `rejected` (the job is
    already terminal) and change nothing; a result for another prediction id comes
    back as `mismatch`.
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
    )
    log.info(
        "job.update",
        job_id=job_id,
        prediction_id=prediction.id,
        status=prediction.status,
        resolved_by=resolved_by.value,
        outcome=result.outcome,
        state=result.state,
    )
    return result


def fail_job(
    deps: Deps, job_id: str, reason: Reason, error: str, resolved_by: ResolvedBy
) -> TransitionResult:
    """Move a non-terminal job to failed with a reason code."""
    return _fail(deps, job_id, reason, error, resolved_by)


def _fail(
    deps: Deps,
    job_id: str,
    reason: Reason,
    error: str,
    resolved_by: ResolvedBy = ResolvedBy.WORKER,
) -> TransitionResult:
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
        },
        poll_at=REMOVE,
    )


def submit_watchdog_s(settings: Settings) -> float:
    """How long a submit may take before the job is treated as an ambiguous submit."""
    return settings.http_timeout_s + SUBMIT_WATCHDOG_MARGIN_S


def cancel_job(deps: Deps, job_id: str) -> TransitionResult:
    """Cancel a job that is not terminal; a submitted one is also deleted at the provider.

    A queued job is then never submitted (the submit sees a terminal job); a late
    webhook for a cancelled job is answered `stale` and changes nothing.
    """
    now = deps.clock()
    job = deps.store.get(job_id)
    result = deps.store.transition(
        job_id,
        JobState.CANCELLED,
        now=now,
        fields={
            "finished_at": now,
            "reason": Reason.CANCELLED_BY_USER.value,
            "resolved_by": ResolvedBy.USER.value,
        },
        poll_at=REMOVE,
    )
    if result.applied and job is not None and job.prediction_id:
        best_effort_delete(deps, job.prediction_id)
    log.info("job.cancel", job_id=job_id, outcome=result.outcome, state=result.state)
    return result


def best_effort_delete(deps: Deps, prediction_id: str) -> None:
    try:
        deps.provider.delete([prediction_id])
    except ProviderError as exc:
        log.info("provider.delete_failed", prediction_id=prediction_id, error=str(exc))


def _mark_ambiguous(deps: Deps, job_id: str, error: str) -> None:
    """Leave the job in `submitting`, flagged, and schedule it for reconciliation."""
    deps.store.set_fields(job_id, {"ambiguous": "1", "error": error})
    delay = min(AMBIGUOUS_FIRST_CHECK_S, deps.settings.poll_after_s)
    deps.store.schedule_poll(job_id, deps.clock() + delay)
