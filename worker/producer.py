"""The Python API producers call: enqueue edits (one, or a batch of any size),
read jobs and batches back, wait, cancel, and redrive failed jobs.

No Celery objects appear in these signatures: the submit queue is handed in as a
plain callable (`worker.tasks.enqueue_submits` in production), and the provider
(for best-effort deletes on cancel) as the service's `Deps`.

Idempotency: a request may carry an `idempotency_key`; its job id is derived from
the key (`job_id_for_key`), and a job is written only if that id is free, so the
same key enqueued twice — from two processes at once, or by re-running a file
after a crash — yields one job and at most one paid submit.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import TypeVar

from worker.domain import (
    PRICE_PER_IMAGE_MICROS,
    PRICE_PER_IMAGE_USD,
    EditRequest,
    Job,
    JobState,
    check_key,
    check_priority,
    job_id_for_key,
)
from worker.errors import ValidationError
from worker.service import Deps, cancel_job
from worker.store import NEW, JobStore

T = TypeVar("T")

# Jobs are written and queued in chunks: one Redis round trip per chunk, not per job.
ENQUEUE_CHUNK = 500
WAIT_POLL_S = 0.25


def new_job_id() -> str:
    return uuid.uuid4().hex


def new_batch_id() -> str:
    return f"b-{uuid.uuid4().hex[:16]}"


@dataclass(frozen=True)
class Item:
    """One request to enqueue, with its optional idempotency key."""

    request: EditRequest
    idempotency_key: str = ""
    priority: int = 0
    # Fixed at creation: derived from the key, or a fresh id when there is none.
    job_id: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.job_id:
            key = self.idempotency_key
            object.__setattr__(self, "job_id", job_id_for_key(key) if key else new_job_id())

    @classmethod
    def coerce(cls, value: Item | EditRequest | Mapping[str, object]) -> Item:
        """Accept an Item, an EditRequest or a JSON-like mapping (validated)."""
        if isinstance(value, Item):
            return value
        if isinstance(value, EditRequest):
            return cls(value)
        request = EditRequest.from_dict(value)
        key = check_key("idempotency_key", value.get("idempotency_key")) or ""
        return cls(request, key, check_priority(value.get("priority")))


@dataclass(frozen=True)
class BatchReceipt:
    """What an enqueue did: jobs written now, jobs that already existed (same key),
    and how many of those were still queued and were sent to the workers again."""

    batch_id: str
    created: int
    existing: int
    resent: int

    @property
    def total(self) -> int:
        return self.created + self.existing


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
    ) -> str:
        """Validate and enqueue one edit; returns its job id (the existing one for a
        repeated idempotency key)."""
        item = Item.coerce(request)
        if idempotency_key is not None:
            key = check_key("idempotency_key", idempotency_key) or ""
            item = Item(item.request, key, item.priority)
        job_id = item.job_id
        self._write_chunk([(job_id, item)], batch_id)
        return job_id

    def enqueue_batch(
        self,
        items: Iterable[Item | EditRequest | Mapping[str, object]],
        *,
        batch_id: str | None = None,
        budget_usd: float | None = None,
        on_chunk: Callable[[BatchReceipt], None] | None = None,
    ) -> BatchReceipt:
        """Enqueue any number of edits as one batch, streamed in chunks of ENQUEUE_CHUNK.

        Each chunk is validated before it is written, so a bad item raises
        ValidationError with nothing of its chunk written (validate a whole file first
        with `worker.batchfile` when you need all-or-nothing). Re-enqueueing the same
        idempotency keys resumes: existing jobs are not duplicated, and those still
        queued are sent to the workers again. `on_chunk` sees the running totals.
        """
        batch_id = batch_id or new_batch_id()
        check_key("batch_id", batch_id)
        if budget_usd is not None:
            if not math.isfinite(budget_usd) or budget_usd < 0:
                raise ValidationError.single("budget", "expected a non-negative amount in USD")
            self.store.set_batch_fields(batch_id, {"budget_micros": round(budget_usd * 1_000_000)})
        created = existing = resent = 0
        for chunk in _chunks(items, ENQUEUE_CHUNK):
            coerced = [Item.coerce(item) for item in chunk]
            c, e, r = self._write_chunk([(item.job_id, item) for item in coerced], batch_id)
            created, existing, resent = created + c, existing + e, resent + r
            if on_chunk is not None:
                on_chunk(BatchReceipt(batch_id, created, existing, resent))
        return BatchReceipt(batch_id, created, existing, resent)

    def _write_chunk(
        self, chunk: Sequence[tuple[str, Item]], batch_id: str
    ) -> tuple[int, int, int]:
        # The records first, then the messages: a worker never gets an id it cannot read.
        answers = self.store.create_many(
            [(job_id, item.request, item.idempotency_key, item.priority) for job_id, item in chunk],
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
                Item(request, key), batch_id=job.batch_id, idempotency_key=key
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


__all__ = ["PRICE_PER_IMAGE_MICROS", "BatchProgress", "BatchReceipt", "Item", "Producer"]
