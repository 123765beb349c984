"""The pure core: edit requests, job states, the transition table, provider outcomes.

No I/O here (no redis, httpx, celery or flask): everything in this module is
tested without a server, and the adapters build on it.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from worker.errors import FieldError, ValidationError

# Limits taken from wavespeed-api.md ("Submit parameters").
SEED_MIN = -1
SEED_MAX = 2_147_483_647
GUIDANCE_MIN = 1.0
GUIDANCE_MAX = 20.0
ASPECT_RATIOS = ("21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21")
# The provider documents no maximum; these keep one bad producer from filling Redis.
MAX_PROMPT_CHARS = 4_000
MAX_URL_CHARS = 4_096
MAX_KEY_CHARS = 200
MODEL = "wavespeed-ai/flux-kontext-max"
PRICE_PER_IMAGE_USD = 0.08
PRICE_PER_IMAGE_MICROS = 80_000  # budgets are kept in integer micro-dollars

_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def job_id_for_key(idempotency_key: str) -> str:
    """The job id an idempotency key always maps to, so every producer agrees on it."""
    return hashlib.sha256(b"kq-idempotency:" + idempotency_key.encode()).hexdigest()[:32]


def is_job_id(value: str) -> bool:
    return bool(_ID_RE.match(value))


_PLAIN_HTTP_URL = re.compile(r"https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:[/?#][!-~]*)?\Z")
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_KEY_RE = re.compile(r"^[A-Za-z0-9._:/@+=-]+$")
REQUEST_FIELDS = ("prompt", "image", "seed", "guidance_scale", "aspect_ratio")
ENVELOPE_FIELDS = ("batch_id", "idempotency_key", "priority")
PRIORITY_MIN, PRIORITY_MAX = -1000, 1000


@dataclass(frozen=True)
class EditRequest:
    """One validated edit: what a producer asks for, in the provider's own terms."""

    prompt: str
    image: str
    seed: int | None = None
    guidance_scale: float | None = None
    aspect_ratio: str | None = None

    def __post_init__(self) -> None:
        errors = _check_request(self)
        if errors:
            raise ValidationError(errors)

    @classmethod
    def from_dict(cls, data: object) -> EditRequest:
        """Build from untrusted JSON-like data; every bad or unknown field is reported."""
        if not isinstance(data, Mapping):
            raise ValidationError.single("request", f"expected a JSON object, got {_kind(data)}")
        unknown = sorted(set(map(str, data)) - set(REQUEST_FIELDS) - set(ENVELOPE_FIELDS))
        errors = [
            FieldError(k, f"unknown field; allowed: {', '.join(REQUEST_FIELDS)}") for k in unknown
        ]
        for name in ("prompt", "image"):
            if name not in data or data[name] is None:
                errors.append(FieldError(name, "is required"))
        if errors:
            raise ValidationError(errors)
        return cls(
            prompt=data["prompt"],
            image=data["image"],
            seed=data.get("seed"),
            guidance_scale=data.get("guidance_scale"),
            aspect_ratio=data.get("aspect_ratio"),
        )

    def to_payload(self) -> dict[str, Any]:
        """The JSON body for the submit call; unset options are left to the provider."""
        payload: dict[str, Any] = {"prompt": self.prompt, "image": self.image}
        if self.seed is not None:
            payload["seed"] = self.seed
        if self.guidance_scale is not None:
            payload["guidance_scale"] = self.guidance_scale
        if self.aspect_ratio is not None:
            payload["aspect_ratio"] = self.aspect_ratio
        return payload


def _kind(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _check_request(req: EditRequest) -> list[FieldError]:
    errors: list[FieldError] = []
    if not isinstance(req.prompt, str):
        errors.append(FieldError("prompt", f"expected a string, got {_kind(req.prompt)}"))
    elif not req.prompt.strip():
        errors.append(FieldError("prompt", "must be a non-empty edit instruction"))
    elif len(req.prompt) > MAX_PROMPT_CHARS:
        errors.append(
            FieldError("prompt", f"is {len(req.prompt)} characters; at most {MAX_PROMPT_CHARS}")
        )
    elif "\x00" in req.prompt:
        errors.append(FieldError("prompt", "must not contain NUL characters"))
    elif _SURROGATE.search(req.prompt):
        # JSON can carry them ("\ud800"), but no UTF-8 request body can.
        errors.append(FieldError("prompt", "must be valid Unicode (no lone surrogates)"))
    url_error = check_http_url(req.image)
    if url_error:
        errors.append(FieldError("image", url_error))
    if req.seed is not None and (
        isinstance(req.seed, bool)
        or not isinstance(req.seed, int)
        or not SEED_MIN <= req.seed <= SEED_MAX
    ):
        errors.append(
            FieldError(
                "seed", f"expected an integer from {SEED_MIN} to {SEED_MAX}, got {req.seed!r}"
            )
        )
    g = req.guidance_scale
    if g is not None and (
        isinstance(g, bool)
        or not isinstance(g, int | float)
        # The range first: isfinite() overflows on an integer too large for a float.
        or not GUIDANCE_MIN <= g <= GUIDANCE_MAX
        or not math.isfinite(g)
    ):
        errors.append(
            FieldError(
                "guidance_scale",
                f"expected a number from {GUIDANCE_MIN} to {GUIDANCE_MAX}, got {g!r}",
            )
        )
    if req.aspect_ratio is not None and req.aspect_ratio not in ASPECT_RATIOS:
        errors.append(
            FieldError(
                "aspect_ratio",
                f"expected one of {', '.join(ASPECT_RATIOS)}, got {req.aspect_ratio!r}",
            )
        )
    return errors


def check_http_url(value: object) -> str | None:
    """Why `value` is not an absolute http(s) URL, or None when it is one."""
    if not isinstance(value, str):
        return f"expected an http(s) URL string, got {_kind(value)}"
    if len(value) > MAX_URL_CHARS:
        return f"URL is {len(value)} characters; at most {MAX_URL_CHARS}"
    if _PLAIN_HTTP_URL.match(value):
        return None  # the common case, without urlsplit's cost (bulk files are 100k lines)
    if _SPACE_OR_CONTROL.search(value) or _SURROGATE.search(value):
        return "URL must not contain whitespace, control characters or lone surrogates"
    try:
        parts = urlsplit(value)
    except ValueError:
        return f"not a valid URL: {value[:80]!r}"
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"expected an http:// or https:// URL, got {value[:80]!r}"
    return None


def check_priority(value: object) -> int:
    """A job's priority: higher goes first within its batch; default 0."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError.single("priority", f"expected an integer, got {_kind(value)}")
    if not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise ValidationError.single(
            "priority", f"expected {PRIORITY_MIN} to {PRIORITY_MAX}, got {value}"
        )
    return value


def check_key(field_name: str, value: object) -> str | None:
    """Validate an optional producer-chosen identifier (batch id, idempotency key)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_KEY_CHARS:
        raise ValidationError.single(
            field_name, f"expected a string of 1 to {MAX_KEY_CHARS} characters"
        )
    if not _KEY_RE.match(value):
        raise ValidationError.single(
            field_name, "may contain only letters, digits and . _ : / @ + = -"
        )
    return value


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
            raise ValidationError.single("prediction", f"expected an object, got {_kind(data)}")
        errors: list[FieldError] = []
        pid = data.get("id")
        if not isinstance(pid, str) or not _ID_RE.match(pid):
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


def poll_interval(poll_count: int, minimum: float, maximum: float) -> float:
    """Seconds until the next poll of one job: doubling from `minimum`, capped."""
    return float(min(maximum, minimum * (2 ** min(poll_count, 20))))


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

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    @property
    def seconds(self) -> float | None:
        """Enqueue-to-result time, once the job is terminal."""
        if not self.finished_at:
            return None
        return max(0.0, self.finished_at - self.created_at)
