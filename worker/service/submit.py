"""The submit use case: send one queued job to WaveSpeed, at most once per paid task."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from enum import StrEnum

import structlog

from worker import replication, telemetry
from worker.admission import LinedUp
from worker.domain import (
    EditRequest,
    Job,
    JobState,
    Reason,
    ResolvedBy,
    TransitionOutcome,
)
from worker.errors import (
    AmbiguousError,
    PermanentError,
    RateLimited,
    TransientError,
    ValidationError,
)
from worker.service.ambiguous import mark_ambiguous
from worker.service.deps import Deps
from worker.service.results import apply_update, best_effort_delete, fail_job, record_submitted
from worker.settings import Settings
from worker.signing import webhook_url
from worker.store import QUEUED_CHECK_S

log = structlog.get_logger("kq.service")

# Added to the HTTP timeout: a submit older than that has no live worker behind it.
SUBMIT_WATCHDOG_MARGIN_S = 10.0


class SubmitOutcome(StrEnum):
    SUBMITTED = "submitted"
    RETRY = "retry"
    FAILED = "failed"
    AMBIGUOUS = "ambiguous"
    SKIPPED = "skipped"
    WAITING = "waiting"  # no provider slot free: the job waits in Redis (admission)


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
    Slots are given back by the job's own moves (to queued or a terminal state, in
    transition.lua), never from here: a job skipped here may be in flight elsewhere.
    """
    job = deps.store.get(job_id)
    bound = _bound(job_id, job)
    checked = _check(deps, job_id, job, bound)
    if isinstance(checked, SubmitResult):
        return checked
    job, request = checked
    if not deps.store.reserve_budget(
        job_id, job.batch_id, request.price_micros, chain_id=job.chain_id
    ):
        return _over_budget(deps, job_id, bound)
    return _send(
        deps, job, request, bound, final_attempt=final_attempt, slot_held=slot_held, fresh=True
    )


def submit_jobs(
    deps: Deps, job_ids: Sequence[str], pool: Executor, *, slot_held: bool = False
) -> list[Future[SubmitResult]]:
    """`submit_job` for many jobs (a chunk, a dispatcher's claim): one future per job.

    Here, for all of them at once: the records are read in one round trip and the
    budgets reserved in one more (each reservation still its own atomic script call).
    Each job that may go on is then sent on `pool` as `submit_job` sends one: its slot
    (unless `slot_held`: a dispatcher's claim holds it), `submitting` claim at the version
    read, WAIT for replicas, POST, record. A job whose record moved on between the read
    and its turn fails the claim's version check and is read again (see `_send`): a stale
    read costs a round trip, never a second POST.

    When no slot may be granted to any of them now (the cap or the rate is reached),
    they all join the waiting line in one call (`Admission.line_up`) instead of one
    refused `acquire` each on the pool: WAITING without a thread.
    """
    futures: list[Future[SubmitResult]] = [Future() for _ in job_ids]
    ready: list[tuple[int, Job, EditRequest, structlog.BoundLogger]] = []
    for i, (job_id, job) in enumerate(zip(job_ids, deps.store.get_many(job_ids), strict=True)):
        bound = _bound(job_id, job)
        checked = _check(deps, job_id, job, bound)
        if isinstance(checked, SubmitResult):
            futures[i].set_result(checked)
        else:
            ready.append((i, *checked, bound))
    budgets = deps.store.reserve_budgets(
        [(job.id, job.batch_id, request.price_micros, job.chain_id) for _, job, request, _ in ready]
    )
    sendable = []
    for (i, job, request, bound), ok in zip(ready, budgets, strict=True):
        if ok:
            sendable.append((i, job, request, bound))
        else:
            futures[i].set_result(_over_budget(deps, job.id, bound))
    if not slot_held and deps.admission is not None and len(sendable) > 1:
        lined_up = deps.admission.line_up(
            [(job.id, job.batch_id, job.priority) for _, job, _, _ in sendable], deps.clock()
        )
        if lined_up is not None:
            for i, job, _, bound in sendable:
                futures[i].set_result(_lined_up(job.id, lined_up, bound))
            return futures
    for i, job, request, bound in sendable:
        # The slot is taken on the pool thread, just before the claim (as `submit_job`
        # does): a slot taken here for a job still waiting for a thread would be held by
        # a worker killed meanwhile until its claim lease ran out (a minute), the job's
        # redelivered message skipping it as "held elsewhere".
        futures[i] = pool.submit(
            _send, deps, job, request, bound, final_attempt=False, slot_held=slot_held, fresh=False
        )
    return futures


def _lined_up(job_id: str, lined_up: LinedUp, bound: structlog.BoundLogger) -> SubmitResult:
    """A job's result when its chunk was put in the waiting line at once (as `_send`
    answers a refused or a held slot)."""
    if job_id in lined_up.held:
        bound.info("submit.slot_held_elsewhere")
        return SubmitResult(SubmitOutcome.SKIPPED, "another attempt holds the slot")
    return SubmitResult(SubmitOutcome.WAITING, f"{lined_up.retry_after_s:.2f}")


def _bound(job_id: str, job: Job | None) -> structlog.BoundLogger:
    # One bind per job (each bind copies the context into a new logger).
    bound: structlog.BoundLogger = (
        log.bind(job_id=job_id)
        if job is None
        else log.bind(job_id=job_id, batch_id=job.batch_id or None)
    )
    return bound


def _check(
    deps: Deps, job_id: str, job: Job | None, bound: structlog.BoundLogger
) -> SubmitResult | tuple[Job, EditRequest]:
    """What the job's record says before anything is reserved: a result when the job
    must not be sent from here, else the job and its request."""
    if job is None:
        bound.warning("submit.unknown_job")
        return SubmitResult(SubmitOutcome.SKIPPED, "no such job")
    if job.terminal or job.prediction_id or job.state is JobState.SUBMITTED:
        bound.debug("submit.skipped", state=job.state.value)
        return SubmitResult(SubmitOutcome.SKIPPED, f"job is {job.state.value}")
    if job.state is JobState.SUBMITTING:
        if deps.clock() - job.submitting_at < submit_watchdog_s(deps.settings):
            # Another attempt (a duplicate message) is posting right now.
            bound.info("submit.in_flight_elsewhere")
            return SubmitResult(SubmitOutcome.SKIPPED, "another attempt is in flight")
        # A previous attempt died between its POST and recording the answer.
        mark_ambiguous(deps, job_id, "redelivered while submitting", expect_version=job.version)
        bound.warning("submit.redelivered_in_flight")
        return SubmitResult(SubmitOutcome.AMBIGUOUS, "previous attempt may have created a task")
    try:
        return job, EditRequest.from_dict(job.request)
    except ValidationError as exc:
        # Only a record written around the producer's checks gets here.
        fail_job(deps, job_id, Reason.INVALID_REQUEST, str(exc))
        bound.error("submit.invalid_request", error=str(exc))
        return SubmitResult(SubmitOutcome.FAILED, str(exc))


def _over_budget(deps: Deps, job_id: str, bound: structlog.BoundLogger) -> SubmitResult:
    fail_job(deps, job_id, Reason.BUDGET, "the batch budget would be exceeded by this image")
    bound.warning("submit.over_budget")
    return SubmitResult(SubmitOutcome.FAILED, "over budget")


def _send(
    deps: Deps,
    job: Job,
    request: EditRequest,
    bound: structlog.BoundLogger,
    *,
    final_attempt: bool,
    slot_held: bool,
    fresh: bool,
) -> SubmitResult:
    """Take a slot, claim the job (`submitting`, at the version read), POST, record.

    `fresh`: `job` was read just now. A record read earlier with its chunk that has
    moved since fails the claim's version check; if it is still queued it is read again
    and sent as `submit_job` would (holding the slot it may have taken here)."""
    deps = deps.on_this_thread()
    store, settings = deps.store, deps.settings
    job_id = job.id
    now = deps.clock()
    if deps.admission is not None and not slot_held:
        decision = deps.admission.acquire(job_id, job.batch_id, job.priority, now)
        if not decision.granted:
            return SubmitResult(SubmitOutcome.WAITING, f"{decision.retry_after_s:.2f}")
        if decision.held_already:
            # Another attempt of this job (a dispatcher's claim) holds the slot: its turn.
            bound.info("submit.slot_held_elsewhere")
            return SubmitResult(SubmitOutcome.SKIPPED, "another attempt holds the slot")
        slot_held = True

    claim = store.transition(
        job_id,
        JobState.SUBMITTING,
        now=now,
        # The price rides on the record: the move that records the task counts it as spent.
        fields={
            "attempts": job.attempts + 1,
            "submitting_at": now,
            "price_micros": request.price_micros,
        },
        expect_version=job.version,
        # A watchdog: if this worker dies mid-submit, the poller looks at the job then.
        poll_at=now + submit_watchdog_s(settings),
    )
    if not claim.applied:
        if (
            not fresh
            and claim.outcome is TransitionOutcome.CONFLICT
            and claim.state == JobState.QUEUED
        ):
            return submit_job(deps, job_id, final_attempt=final_attempt, slot_held=slot_held)
        bound.info("submit.lost_race", outcome=claim.outcome, state=claim.state)
        return SubmitResult(SubmitOutcome.SKIPPED, f"job moved to {claim.state}")
    unreplicated = _unless_replicated(deps, job_id, claim.version, bound)
    if unreplicated is not None:
        return unreplicated

    hook = (
        webhook_url(settings.webhook_public_url, settings.secret_key, job_id)
        if settings.webhooks_enabled
        else None
    )
    try:
        prediction = deps.provider.submit(request, webhook_url=hook)
    except AmbiguousError as exc:
        mark_ambiguous(deps, job_id, str(exc), expect_version=claim.version, answer_lost=True)
        bound.warning("submit.ambiguous", error=str(exc))
        deps.count({"submit.ambiguous": 1})
        return SubmitResult(SubmitOutcome.AMBIGUOUS, str(exc))
    except TransientError as exc:
        if final_attempt:
            fail_job(deps, job_id, Reason.SUBMIT_RETRIES_EXHAUSTED, str(exc), created_no_task=True)
            bound.error("submit.retries_exhausted", error=str(exc))
            deps.count({"submit.exhausted": 1})
            return SubmitResult(SubmitOutcome.FAILED, str(exc))
        store.transition(
            job_id,
            JobState.QUEUED,
            now=deps.clock(),
            expect_version=claim.version,
            # Checked later in case the retry message is lost (see poller.poll_job).
            poll_at=deps.clock() + QUEUED_CHECK_S,
            # The provider answered (429, 5xx) or was never reached: no task came of it.
            attempt_created_no_task=True,
        )
        bound.info("submit.transient_error", error=str(exc), status=exc.status_code)
        if isinstance(exc, RateLimited) and deps.admission is not None:
            # Everyone slows down, and this job waits its turn again (no Celery retry).
            deps.admission.penalize(deps.clock())
            deps.admission.wait(job_id, job.batch_id, job.priority, deps.clock())
            deps.count({"submit.retry": 1, "submit.rate_limited": 1})
            return SubmitResult(SubmitOutcome.WAITING, str(exc))
        deps.count({"submit.retry": 1, "submit.rate_limited": int(exc.status_code == 429)})
        return SubmitResult(SubmitOutcome.RETRY, str(exc))
    except PermanentError as exc:
        fail_job(deps, job_id, Reason.SUBMIT_REJECTED, str(exc), created_no_task=True)
        bound.error("submit.rejected", error=str(exc), status=exc.status_code)
        deps.count({"submit.rejected": 1})
        return SubmitResult(SubmitOutcome.FAILED, str(exc))

    recorded = record_submitted(deps, job_id, prediction.id)
    # DEBUG: a line per job at INFO was a measurable share of a worker's CPU per job
    # (bench: pipeline overhead); the job's record and its final event hold the same ids.
    # (The prediction id goes on the line itself: no logger is bound for it per job.)
    bound.debug("submit.ok", prediction_id=prediction.id, recorded=recorded.outcome.value)
    # The job's own model's price: cost today and in total (worker.status).
    deps.count({"submit.submitted": 1, telemetry.COST_SUBMITTED_MICROS: request.price_micros})
    if recorded.outcome is TransitionOutcome.REJECTED and recorded.state == JobState.CANCELLED:
        # Cancelled while our POST was in flight: the task exists, so drop it.
        best_effort_delete(deps, prediction.id)
    if prediction.final:
        apply_update(deps, job_id, prediction, ResolvedBy.WORKER)
    return SubmitResult(SubmitOutcome.SUBMITTED, prediction.id)


def _unless_replicated(
    deps: Deps, job_id: str, version: int, bound: structlog.BoundLogger
) -> SubmitResult | None:
    """None when the `submitting` record reached KQ_REDIS_WAIT_REPLICAS replicas (or the
    check is off); else the job goes back to queued unsent, as after an attempt known to
    have created no task, and is retried later (RETRY, with back-off; never failed for it).

    A failover could otherwise promote a replica that never saw the claim, and the job
    would be submitted, and paid, again."""
    settings = deps.settings
    if settings.redis_wait_replicas <= 0:
        return None
    answer = replication.confirm_claim(
        deps.store.redis,
        job_id,
        version=version,
        replicas=settings.redis_wait_replicas,
        timeout_ms=settings.redis_wait_timeout_ms,
    )
    if answer.confirmed:
        return None
    deps.store.transition(
        job_id,
        JobState.QUEUED,
        now=deps.clock(),
        expect_version=version,
        poll_at=deps.clock() + QUEUED_CHECK_S,
        attempt_created_no_task=True,
    )
    bound.warning("submit.unreplicated", replicas=answer.replicas, detail=answer.detail)
    deps.count({"submit.unreplicated": 1})
    return SubmitResult(SubmitOutcome.RETRY, f"not replicated: {answer.detail}")


def submit_watchdog_s(settings: Settings) -> float:
    """How long a submit may take before the job is treated as an ambiguous submit."""
    return settings.http_timeout_s + SUBMIT_WATCHDOG_MARGIN_S
