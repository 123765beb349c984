"""The Python API producers call: enqueue edits (one, or a batch of any size),
read jobs and batches back, wait, cancel, and redrive failed jobs.

No Celery objects appear in these signatures: the submit queue is handed in as a
plain callable (`worker.tasks.enqueue_submits` in production), and the provider
(for best-effort deletes on cancel) as the service's `Deps`.

Idempotency: a request may carry an `idempotency_key`; its job id is derived from
the key (`job_id_for_key`), and a job is written only if that id is free, so the
same key enqueued twice — from two processes at once, or by re-running a file
after a crash — yields one job and at most one paid submit.

Metadata: a request may carry a `metadata` JSON object of the producer's own (at most
MAX_METADATA_BYTES as compact JSON); it is stored on the job and repeated, with the
idempotency key, in the job's result event, so a consumer can match a result to its
own order without a lookup.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from typing import Any, TypeVar

from worker.domain import (
    PRICE_PER_IMAGE_MICROS,
    PRICE_PER_IMAGE_USD,
    REQUEST_FIELDS,
    EditRequest,
    Job,
    JobState,
    check_key,
    check_priority,
    job_id_for_key,
    kind_of,
)
from worker.errors import FieldError, ValidationError
from worker.service import Deps, cancel_job
from worker.store import NEW, JobStore

T = TypeVar("T")

# Jobs are written and queued in chunks: one Redis round trip per chunk, not per job.
ENQUEUE_CHUNK = 500
WAIT_POLL_S = 0.25
# The producer's metadata object, as compact UTF-8 JSON, at most this many bytes.
MAX_METADATA_BYTES = 4096
# A budget above this is a typo, not a plan (and must stay exact in micro-dollars).
MAX_BUDGET_USD = 1_000_000_000
# What an item may carry beside the edit itself (`batch_id` only where the caller says).
ITEM_ENVELOPE_FIELDS = ("idempotency_key", "priority", "metadata")
# A filtered page of a batch's jobs reads at most this many members of the batch.
PAGE_SCAN_MAX = 5000
_PLACEHOLDER_PROMPT = "-"
_PLACEHOLDER_IMAGE = "https://example.invalid/"
# The form of an image URL every producer's item must have: http(s), an ASCII host (IDN in
# punycode; no IPv6 literal), then any path, query or fragment without white space or
# control characters (non-ASCII is fine; lone surrogates are refused by EditRequest, and
# are left out here because JSON Schema regex engines cannot name them). docs/openapi.yaml
# states the same pattern, so the HTTP API's description and behaviour cannot drift apart.
_URL_SPACE = (
    "\\u0000-\\u0020\\u007f\\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
)
_URL_HOST = "\\u0021\\u0022\\u0024-\\u002e\\u0030-\\u003e\\u0040-\\u005a\\u005c\\u005e-\\u007e"
IMAGE_URL_PATTERN = f"^https?://[{_URL_HOST}]+([/?#][^{_URL_SPACE}]*)?$"
_IMAGE_URL = re.compile(IMAGE_URL_PATTERN)


def new_job_id() -> str:
    return uuid.uuid4().hex


def new_batch_id() -> str:
    return f"b-{uuid.uuid4().hex[:16]}"


@dataclass(frozen=True)
class Item:
    """One request to enqueue, with its optional idempotency key, priority and metadata."""

    request: EditRequest
    idempotency_key: str = ""
    priority: int = 0
    # Fixed at creation: derived from the key, or a fresh id when there is none.
    job_id: str = field(default="", compare=False)
    # The producer's own JSON object (checked by `check_metadata`), or None.
    metadata: Mapping[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if not self.job_id:
            key = self.idempotency_key
            object.__setattr__(self, "job_id", job_id_for_key(key) if key else new_job_id())

    @classmethod
    def coerce(cls, value: Item | EditRequest | Mapping[str, object]) -> Item:
        """Accept an Item, an EditRequest or a JSON-like mapping (validated; a mapping
        may also carry `batch_id`, which is the caller's to read)."""
        if isinstance(value, Item):
            return value
        if isinstance(value, EditRequest):
            return cls(value)
        return item_from_dict(value, envelope=("batch_id", *ITEM_ENVELOPE_FIELDS))


def item_from_dict(
    data: object,
    *,
    envelope: Sequence[str] = ITEM_ENVELOPE_FIELDS,
    refused: Mapping[str, str] | None = None,
) -> Item:
    """Validate one JSON-like item; a ValidationError names every bad field at once.

    `envelope`: the fields accepted beside the edit's own (REQUEST_FIELDS); an unknown
    field's error lists all accepted ones. `refused`: fields refused with their own message
    (e.g. `batch_id` on a batch line).
    """
    if not isinstance(data, Mapping):
        raise ValidationError.single("request", f"expected a JSON object, got {kind_of(data)}")
    allowed = (*REQUEST_FIELDS, *envelope)
    errors: list[FieldError] = []
    for name in sorted(map(str, data)):
        if refused and name in refused:
            errors.append(FieldError(name, refused[name]))
        elif name not in allowed:
            errors.append(FieldError(name, f"unknown field; allowed: {', '.join(allowed)}"))
    missing = [name for name in ("prompt", "image") if data.get(name) is None]
    errors.extend(FieldError(name, "is required") for name in missing)
    request: EditRequest | None = None
    try:
        # A missing prompt or image stands in as a valid one, so that the other
        # fields are still checked and every problem of the item is named together.
        request = EditRequest(
            prompt=_PLACEHOLDER_PROMPT if "prompt" in missing else data["prompt"],
            image=_PLACEHOLDER_IMAGE if "image" in missing else data["image"],
            seed=data.get("seed"),
            guidance_scale=data.get("guidance_scale"),
            aspect_ratio=data.get("aspect_ratio"),
        )
    except ValidationError as exc:
        errors.extend(exc.errors)
    image = data.get("image")
    # fullmatch: `$` alone would let a final newline through.
    if (
        isinstance(image, str)
        and not any(e.field == "image" for e in errors)
        and not _IMAGE_URL.fullmatch(image)
    ):
        errors.append(
            FieldError(
                "image",
                "expected http:// or https://, an ASCII host (user:password@ and :port "
                "allowed; IDN in punycode; no IPv6 literal), then an optional path; "
                f"got {image[:80]!r}",
            )
        )
    key = priority = metadata = None
    try:
        key = check_key("idempotency_key", data.get("idempotency_key"))
    except ValidationError as exc:
        errors.extend(exc.errors)
    try:
        priority = check_priority(data.get("priority"))
    except ValidationError as exc:
        errors.extend(exc.errors)
    try:
        metadata = check_metadata(data.get("metadata"))
    except ValidationError as exc:
        errors.extend(exc.errors)
    if errors or request is None:
        raise ValidationError(errors)
    return Item(request, key or "", priority or 0, metadata=metadata)


def check_metadata(value: object) -> dict[str, Any] | None:
    """The producer's metadata: a JSON object of at most MAX_METADATA_BYTES as compact
    UTF-8 JSON (None when absent). Returns a plain copy."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValidationError.single("metadata", f"expected a JSON object, got {kind_of(value)}")
    try:
        text = json.dumps(dict(value), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValidationError.single("metadata", f"must be plain JSON ({exc})") from None
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValidationError.single(
            "metadata", "must be valid Unicode (no lone surrogates)"
        ) from None
    if size > MAX_METADATA_BYTES:
        raise ValidationError.single(
            "metadata", f"is {size} bytes as JSON; at most {MAX_METADATA_BYTES}"
        )
    copy: dict[str, Any] = json.loads(text)
    return copy


def check_budget(value: object, field_name: str = "budget") -> float | None:
    """A batch budget in USD: 0 to MAX_BUDGET_USD (None: no budget)."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        # The range first: isfinite() overflows on an integer too large for a float.
        or not 0 <= value <= MAX_BUDGET_USD
        or not math.isfinite(value)
    ):
        raise ValidationError.single(
            field_name, f"expected an amount in USD from 0 to {MAX_BUDGET_USD:,}, got {value!r}"
        )
    return float(value)


@dataclass(frozen=True)
class BatchReceipt:
    """What an enqueue did: jobs written now, jobs that already existed (same key),
    and how many of those were still queued and were sent to the workers again.
    `job_ids`, when asked for: the job of each item, in the order of the items."""

    batch_id: str
    created: int
    existing: int
    resent: int
    job_ids: tuple[str, ...] | None = None

    @property
    def total(self) -> int:
        return self.created + self.existing

    def as_dict(self) -> dict[str, object]:
        data: dict[str, object] = {
            "batch_id": self.batch_id,
            "created": self.created,
            "existing": self.existing,
            "resent": self.resent,
            "total": self.total,
        }
        if self.job_ids is not None:
            data["job_ids"] = list(self.job_ids)
        return data


def job_json(job: Job) -> dict[str, Any]:
    """A job as the product serves it in JSON (`kq job --json`, the HTTP API): numbers as
    numbers, times as unix seconds or null when not (yet) known, `seconds` end to end."""
    data = asdict(job)
    data["state"] = job.state.value
    data["outputs"] = list(job.outputs)
    data["candidates"] = list(job.candidates)
    data["metadata"] = None if job.metadata is None else dict(job.metadata)
    for name in ("created_at", "submitting_at", "submitted_at", "finished_at"):
        data[name] = data[name] or None
    data["candidates_final_at"] = job.candidates_final_at or None
    data["seconds"] = job.seconds
    return data


@dataclass(frozen=True)
class BatchProgress:
    """A batch's counters, cost and pace at one moment."""

    batch_id: str
    total: int
    queued: int
    in_flight: int
    completed: int
    failed: int
    cancelled: int
    paid: int
    budget_usd: float | None
    created_at: float
    now: float
    last_finished_at: float = 0.0

    @property
    def terminal(self) -> int:
        return self.completed + self.failed + self.cancelled

    @property
    def done(self) -> bool:
        return self.total > 0 and self.terminal >= self.total

    @property
    def cost_usd(self) -> float:
        return round(self.paid * PRICE_PER_IMAGE_USD, 2)

    @property
    def rate_per_s(self) -> float:
        """Jobs finished per second since the batch was created (until its last one)."""
        end = self.last_finished_at if self.done and self.last_finished_at else self.now
        elapsed = end - self.created_at
        return self.terminal / elapsed if elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        remaining = self.total - self.terminal
        if remaining <= 0:
            return 0.0
        rate = self.rate_per_s
        return remaining / rate if rate > 0 else None

    def as_dict(self) -> dict[str, object]:
        eta = self.eta_s
        return {
            "batch_id": self.batch_id,
            "total": self.total,
            "queued": self.queued,
            "in_flight": self.in_flight,
            "completed": self.completed,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "paid_submits": self.paid,
            "cost_usd": self.cost_usd,
            "budget_usd": self.budget_usd,
            "rate_per_s": round(self.rate_per_s, 3),
            "eta_s": None if eta is None or math.isinf(eta) else round(eta, 1),
            "done": self.done,
        }


@dataclass
class Producer:
    """Enqueue jobs and read them back. Thread-safe when its adapters are."""

    store: JobStore
    send: Callable[[list[str]], None]
    clock: Callable[[], float] = field(default=time.time)
    # For cancel: the provider client used to delete submitted tasks (best effort).
    deps: Deps | None = None

    # --- enqueue -------------------------------------------------------------------

    def enqueue(
        self,
        request: Item | EditRequest | Mapping[str, object],
        *,
        batch_id: str = "",
        idempotency_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Validate and enqueue one edit; returns its job id (the existing one for a
        repeated idempotency key)."""
        receipt = self.enqueue_one(
            request, batch_id=batch_id, idempotency_key=idempotency_key, metadata=metadata
        )
        assert receipt.job_ids is not None
        return receipt.job_ids[0]

    def enqueue_one(
        self,
        request: Item | EditRequest | Mapping[str, object],
        *,
        batch_id: str = "",
        idempotency_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> BatchReceipt:
        """`enqueue`, answering like a batch: created 1, or existing 1 (a repeated key;
        resent 1 if that job was still queued), and the job id in `job_ids`."""
        item = Item.coerce(request)
        if idempotency_key is not None:
            key = check_key("idempotency_key", idempotency_key) or ""
            item = Item(item.request, key, item.priority, metadata=item.metadata)
        if metadata is not None:
            item = replace(item, metadata=check_metadata(metadata))
        if batch_id:
            check_key("batch_id", batch_id)
        created, existing, resent = self._write_chunk([(item.job_id, item)], batch_id)
        return BatchReceipt(batch_id, created, existing, resent, (item.job_id,))

    def enqueue_batch(
        self,
        items: Iterable[Item | EditRequest | Mapping[str, object]],
        *,
        batch_id: str | None = None,
        budget_usd: float | None = None,
        on_chunk: Callable[[BatchReceipt], None] | None = None,
        keep_job_ids: bool = False,
    ) -> BatchReceipt:
        """Enqueue any number of edits as one batch, streamed in chunks of ENQUEUE_CHUNK.

        Each chunk is validated before it is written, so a bad item raises
        ValidationError with nothing of its chunk written (validate a whole file first
        with `worker.batchfile` when you need all-or-nothing). Re-enqueueing the same
        idempotency keys resumes: existing jobs are not duplicated, and those still
        queued are sent to the workers again. `on_chunk` sees the running totals.
        `keep_job_ids`: the receipt lists the job of every item, in item order.
        """
        batch_id = batch_id or new_batch_id()
        check_key("batch_id", batch_id)
        budget = check_budget(budget_usd)
        if budget is not None:
            self.store.set_batch_fields(batch_id, {"budget_micros": round(budget * 1_000_000)})
        created = existing = resent = 0
        job_ids: list[str] | None = [] if keep_job_ids else None
        for chunk in _chunks(items, ENQUEUE_CHUNK):
            coerced = [Item.coerce(item) for item in chunk]
            c, e, r = self._write_chunk([(item.job_id, item) for item in coerced], batch_id)
            created, existing, resent = created + c, existing + e, resent + r
            if job_ids is not None:
                job_ids.extend(item.job_id for item in coerced)
            if on_chunk is not None:
                on_chunk(BatchReceipt(batch_id, created, existing, resent))
        ids = None if job_ids is None else tuple(job_ids)
        return BatchReceipt(batch_id, created, existing, resent, ids)

    def _write_chunk(
        self, chunk: Sequence[tuple[str, Item]], batch_id: str
    ) -> tuple[int, int, int]:
        # The records first, then the messages: a worker never gets an id it cannot read.
        answers = self.store.create_many(
            [
                (job_id, item.request, item.idempotency_key, item.priority, item.metadata)
                for job_id, item in chunk
            ],
            batch_id=batch_id,
            now=self.clock(),
        )
        to_send = [
            job_id
            for (job_id, _), answer in zip(chunk, answers, strict=True)
            if answer in (NEW, JobState.QUEUED.value)
        ]
        if to_send:
            self.send(to_send)
        created = sum(1 for a in answers if a == NEW)
        resent = len(to_send) - created
        return created, len(answers) - created, resent

    # --- read ----------------------------------------------------------------------

    def get_job(self, job_id: str) -> Job | None:
        return self.store.get(job_id)

    def get_jobs(self, job_ids: Sequence[str]) -> list[Job | None]:
        return self.store.get_many(job_ids)

    def batch_jobs(self, batch_id: str, *, offset: int = 0, limit: int = 1000) -> list[Job]:
        ids = self.store.batch_members(batch_id, offset, offset + limit - 1)
        return [j for j in self.store.get_many(ids) if j is not None]

    def batch_jobs_page(
        self, batch_id: str, *, start: int = 0, limit: int = 100, state: JobState | None = None
    ) -> tuple[list[Job], int | None]:
        """A page of a batch's jobs in enqueue order, from member position `start`: up to
        `limit` jobs (only those in `state`, if given), and the position the next page
        starts at (None: no more). A filtered page reads at most PAGE_SCAN_MAX members,
        so it may hold fewer than `limit` jobs and still not be the last one."""
        jobs: list[Job] = []
        position = start
        while position - start < PAGE_SCAN_MAX:
            want = limit - len(jobs) if state is None else ENQUEUE_CHUNK
            ids = self.store.batch_members(batch_id, position, position + want - 1)
            if not ids:
                return jobs, None
            for offset, job in enumerate(self.store.get_many(ids)):
                if job is None or (state is not None and job.state is not state):
                    continue
                jobs.append(job)
                if len(jobs) == limit:
                    after = position + offset + 1
                    more = self.store.batch_members(batch_id, after, after)
                    return jobs, after if more else None
            position += len(ids)
        more = self.store.batch_members(batch_id, position, position)
        return jobs, position if more else None

    def batch_progress(self, batch_id: str) -> BatchProgress | None:
        raw = self.store.batch_counts(batch_id)
        if "total" not in raw:
            return None
        counts = {k: int(v) for k, v in raw.items()}
        budget = raw.get("budget_micros")
        return BatchProgress(
            batch_id=batch_id,
            total=counts.get("total", 0),
            queued=counts.get("now:queued", 0),
            in_flight=counts.get("now:submitting", 0) + counts.get("now:submitted", 0),
            completed=counts.get("completed", 0),
            failed=counts.get("failed", 0),
            cancelled=counts.get("cancelled", 0),
            paid=counts.get("paid", 0),
            budget_usd=None if budget is None else budget / 1_000_000,
            created_at=raw.get("created_at", 0.0),
            last_finished_at=raw.get("last_finished_at", 0.0),
            now=self.clock(),
        )

    # --- wait ----------------------------------------------------------------------

    def wait_job(self, job_id: str, *, timeout_s: float) -> Job | None:
        """The job once terminal, or as it is when `timeout_s` runs out (None if unknown)."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.store.get(job_id)
            if job is None or job.terminal or time.monotonic() >= deadline:
                return job
            time.sleep(WAIT_POLL_S)

    def wait_batch(
        self,
        batch_id: str,
        *,
        timeout_s: float,
        on_progress: Callable[[BatchProgress], None] | None = None,
    ) -> BatchProgress | None:
        """Block until every job of the batch is terminal or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            progress = self.batch_progress(batch_id)
            if progress is not None and on_progress is not None:
                on_progress(progress)
            if progress is None or progress.done or time.monotonic() >= deadline:
                return progress
            time.sleep(WAIT_POLL_S)

    def wait(
        self,
        job_ids: Sequence[str],
        *,
        timeout_s: float,
        on_progress: Callable[[list[Job | None]], None] | None = None,
    ) -> list[Job | None]:
        """Block until every listed job is terminal or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            jobs = self.store.get_many(job_ids)
            if on_progress is not None:
                on_progress(jobs)
            if all(j is not None and j.terminal for j in jobs) or time.monotonic() >= deadline:
                return jobs
            time.sleep(WAIT_POLL_S)

    # --- cancel, dead letters, redrive ---------------------------------------------------

    def cancel_job(self, job_id: str) -> bool:
        """Cancel one job; False when it is unknown or already terminal."""
        return cancel_job(self._deps(), job_id).applied

    def cancel_batch(self, batch_id: str) -> int:
        """Cancel every job of a batch that is not terminal yet; returns how many."""
        cancelled = 0
        offset = 0
        while True:
            ids = self.store.batch_members(batch_id, offset, offset + ENQUEUE_CHUNK - 1)
            if not ids:
                return cancelled
            for job in self.store.get_many(ids):
                if job is not None and not job.terminal and self.cancel_job(job.id):
                    cancelled += 1
            offset += len(ids)

    def dead_letters(self, *, limit: int = 100, reason: str | None = None) -> list[Job]:
        """Failed jobs, most recent first, optionally only those with one reason code."""
        jobs = [j for j in self.store.get_many(self.store.dlq(0, limit)) if j is not None]
        return [j for j in jobs if reason is None or j.reason == reason]

    def redrive(self, job_ids: Sequence[str]) -> dict[str, str]:
        """Enqueue failed or cancelled jobs again as new attempts; old id -> new id.

        Idempotent: redriving the same job twice gives the same new job (its key is
        derived from the old job id), so nothing is submitted twice.
        """
        new_ids: dict[str, str] = {}
        for job in self.store.get_many(job_ids):
            if job is None or job.state not in (JobState.FAILED, JobState.CANCELLED):
                continue
            request = EditRequest.from_dict(job.request)
            key = f"redrive:{job.id}"
            new_ids[job.id] = self.enqueue(
                Item(request, key, metadata=job.metadata),
                batch_id=job.batch_id,
                idempotency_key=key,
            )
        self.store.remove_from_dlq(list(new_ids))
        return new_ids

    def _deps(self) -> Deps:
        if self.deps is None:
            raise RuntimeError("this Producer was built without provider access (deps)")
        return self.deps


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


__all__ = [
    "MAX_METADATA_BYTES",
    "PRICE_PER_IMAGE_MICROS",
    "BatchProgress",
    "BatchReceipt",
    "Item",
    "Producer",
    "check_budget",
    "check_metadata",
    "item_from_dict",
    "job_json",
]
