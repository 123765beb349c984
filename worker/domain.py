"""The pure core: job states, the transition table, provider outcomes, the stored job.

No I/O here (no redis, httpx, celery or flask): everything in this module is
tested without a server, and the adapters build on it. Edit requests and their
validation live in `worker.request` and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from worker.errors import FieldError, ValidationError
from worker.request import (  # re-exported: the domain is one name to import from
    ASPECT_RATIOS as ASPECT_RATIOS,
)
from worker.request import (
    ENVELOPE_FIELDS as ENVELOPE_FIELDS,
)
from worker.request import (
    GUIDANCE_MAX as GUIDANCE_MAX,
)
from worker.request import (
    GUIDANCE_MIN as GUIDANCE_MIN,
)
from worker.request import (
    HEX32_RE as HEX32_RE,
)
from worker.request import (
    MAX_KEY_CHARS as MAX_KEY_CHARS,
)
from worker.request import (
    MAX_PROMPT_CHARS as MAX_PROMPT_CHARS,
)
from worker.request import (
    MAX_URL_CHARS as MAX_URL_CHARS,
)
from worker.request import (
    MODEL as MODEL,
)
from worker.request import (
    PRICE_PER_IMAGE_MICROS as PRICE_PER_IMAGE_MICROS,
)
from worker.request import (
    PRICE_PER_IMAGE_USD as PRICE_PER_IMAGE_USD,
)
from worker.request import (
    REQUEST_FIELDS as REQUEST_FIELDS,
)
from worker.request import (
    SEED_MAX as SEED_MAX,
)
from worker.request import (
    SEED_MIN as SEED_MIN,
)
from worker.request import (
    EditRequest as EditRequest,
)
from worker.request import (
    check_http_url as check_http_url,
)
from worker.request import (
    check_key as check_key,
)
from worker.request import (
    check_priority as check_priority,
)
from worker.request import (
    is_job_id as is_job_id,
)
from worker.request import (
    job_id_for_key as job_id_for_key,
)
from worker.request import (
    kind_of as kind_of,
)


class JobState(StrEnum):
    """Where a job is; see architecture.md, "The job and its states"."""

    QUEUED = "queued"
    SUBMITTING = "submitting"
    SUBMITTED = "submitted"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})

# target state -> the states it may be reached from. Terminal states appear on no
# right-hand side: they absorb. The single backward edge (submitting -> queued) is
# the retry after a transient submit error, and is guarded by the job's version.
ALLOWED_FROM: Mapping[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.SUBMITTING}),
    JobState.SUBMITTING: frozenset({JobState.QUEUED}),
    JobState.SUBMITTED: frozenset({JobState.SUBMITTING}),
    # A result may arrive while the worker still says "submitting": with a fast
    # model the webhook can beat the worker's own write of the prediction id.
    JobState.COMPLETED: frozenset({JobState.SUBMITTING, JobState.SUBMITTED}),
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.SUBMITTING, JobState.SUBMITTED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED, JobState.SUBMITTING, JobState.SUBMITTED}),
}


class TransitionOutcome(StrEnum):
    """What the store did with a requested move (or flag change) of one job."""

    APPLIED = "applied"
    REJECTED = "rejected"  # the table forbids it from the current state (e.g. terminal)
    CONFLICT = "conflict"  # the job's version moved on since the caller read it
    MISMATCH = "mismatch"  # the result names another prediction than the job's (or its owner's)
    MISSING = "missing"  # no such job (never written, or expired)
    DUPLICATE = "duplicate"  # this webhook delivery was applied before; nothing done


def can_move(current: JobState, target: JobState) -> bool:
    """Whether the transition table allows current -> target."""
    return current in ALLOWED_FROM[target]


class Reason(StrEnum):
    """Why a job failed or was cancelled; stable codes for events and the DLQ."""

    PROVIDER_FAILED = "provider_failed"
    NSFW = "nsfw"
    DEADLINE = "deadline"
    SUBMIT_REJECTED = "submit_rejected"
    SUBMIT_AMBIGUOUS = "submit_ambiguous"
    SUBMIT_RETRIES_EXHAUSTED = "submit_retries_exhausted"
    INVALID_REQUEST = "invalid_request"
    BUDGET = "budget"
    CANCELLED_BY_USER = "cancelled_by_user"
    # The provider answered 404 for the job's task (deleted, expired, or forgotten).
    TASK_NOT_FOUND = "task_not_found"


class ResolvedBy(StrEnum):
    """Which path delivered a job's final result."""

    WEBHOOK = "webhook"
    POLL = "poll"
    WORKER = "worker"
    USER = "user"


# Provider statuses: created -> processing -> completed | failed, plus the newer
# failure terminals. Anything unknown is treated as "not final yet".
PROVIDER_FAILURE_STATUSES = frozenset({"failed", "cancelled", "timeout", "deleted"})
MODERATION_TASK_CODE = 1200


@dataclass(frozen=True)
class Prediction:
    """The provider's view of one task, checked for the fields we rely on."""

    id: str
    status: str
    outputs: tuple[str, ...] = ()
    error: str = ""
    task_code: int | None = None
    has_nsfw_contents: tuple[bool, ...] = ()
    created_at: str = ""
    raw_extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.status == "completed" or self.status in PROVIDER_FAILURE_STATUSES

    @classmethod
    def from_json(cls, data: object) -> Prediction:
        """Parse a prediction object (the `data` of an envelope, or a webhook body)."""
        if not isinstance(data, Mapping):
            raise ValidationError.single("prediction", f"expected an object, got {kind_of(data)}")
        errors: list[FieldError] = []
        pid = data.get("id")
        if not isinstance(pid, str) or not HEX32_RE.match(pid):
            errors.append(FieldError("id", "expected 32 lowercase hex characters"))
        status = data.get("status")
        if not isinstance(status, str) or not status:
            errors.append(FieldError("status", "expected a non-empty string"))
        outputs = data.get("outputs") or []
        if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
            errors.append(FieldError("outputs", "expected an array of URL strings"))
            outputs = []
        error = data.get("error") or ""
        if not isinstance(error, str):
            error = str(error)
        code = data.get("code")
        if isinstance(code, bool) or not isinstance(code, int):
            code = None
        nsfw = data.get("has_nsfw_contents") or []
        if not isinstance(nsfw, list):
            nsfw = []
        if status == "completed" and not outputs:
            errors.append(FieldError("outputs", "a completed prediction must have outputs"))
        if errors:
            raise ValidationError(errors)
        created = data.get("created_at")
        return cls(
            id=str(pid),
            status=str(status),
            outputs=tuple(outputs),
            error=error,
            task_code=code,
            has_nsfw_contents=tuple(bool(x) for x in nsfw),
            created_at=created if isinstance(created, str) else "",
        )


@dataclass(frozen=True)
class Outcome:
    """The job state a final prediction leads to, with the fields to record."""

    state: JobState
    reason: str = ""
    error: str = ""
    outputs: tuple[str, ...] = ()


def outcome_of(prediction: Prediction) -> Outcome | None:
    """Map a provider prediction to our terminal outcome; None while it is not final."""
    if prediction.status == "completed":
        return Outcome(JobState.COMPLETED, outputs=prediction.outputs)
    if prediction.status in PROVIDER_FAILURE_STATUSES:
        if prediction.task_code == MODERATION_TASK_CODE:
            reason = Reason.NSFW.value
        else:
            reason = Reason.PROVIDER_FAILED.value
        detail = prediction.error or f"prediction {prediction.status}"
        if prediction.task_code is not None:
            detail = f"{detail} (task code {prediction.task_code})"
        if prediction.status != "failed":
            detail = f"{prediction.status}: {detail}"
        return Outcome(JobState.FAILED, reason=reason, error=detail)
    return None


def summary_line(counts: Mapping[str, int]) -> str:
    """The last line of `kq run`: "N jobs: A completed, ... (W by webhook, P by poll)"."""
    total = counts.get("completed", 0) + counts.get("failed", 0) + counts.get("cancelled", 0)
    total += counts.get("pending", 0)
    return (
        f"{total} jobs: {counts.get('completed', 0)} completed, {counts.get('failed', 0)} failed, "
        f"{counts.get('cancelled', 0)} cancelled ({counts.get('webhook', 0)} by webhook, "
        f"{counts.get('poll', 0)} by poll)"
    )


@dataclass(frozen=True)
class Job:
    """A job as stored: the request plus everything that happened to it."""

    id: str
    state: JobState
    version: int
    request: Mapping[str, Any]
    batch_id: str = ""
    prediction_id: str = ""
    idempotency_key: str = ""
    priority: int = 0
    attempts: int = 0
    ambiguous: bool = False
    created_at: float = 0.0
    submitting_at: float = 0.0
    submitted_at: float = 0.0
    finished_at: float = 0.0
    outputs: tuple[str, ...] = ()
    error: str = ""
    reason: str = ""
    task_code: int | None = None
    resolved_by: str = ""
    poll_count: int = 0
    # Reconciliation of an ambiguous submit: when every task that could be this job's was
    # first seen finished, and (once it failed submit_ambiguous) which tasks those were.
    candidates_final_at: float = 0.0
    candidates: tuple[str, ...] = ()
    # (task id, when first seen finished) for each current candidate (reconciliation's own).
    candidates_seen: tuple[tuple[str, float], ...] = ()
    # When the submit that made the job ambiguous lost its answer (0: its worker died).
    answer_lost_at: float = 0.0
    # The producer's own JSON object, stored as given (size-limited at enqueue); None: none.
    metadata: Mapping[str, Any] | None = None
    # A step of a chain (worker/chains.py): its chain, step number (1-based) and branch.
    chain_id: str = ""
    step: int = 0
    branch: str = ""

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    @property
    def seconds(self) -> float | None:
        """Enqueue-to-result time, once the job is terminal."""
        if not self.finished_at:
            return None
        return max(0.0, self.finished_at - self.created_at)
