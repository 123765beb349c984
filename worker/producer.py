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

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Any, TypeVar

import structlog

from worker import keys
from worker.batch_views import BatchProgress, BatchReceipt, job_json
from worker.chain_producer import ChainMethods
from worker.chain_store import RETRIED, ChainStore
from worker.chains import ChainItem, chain_from_dict, is_chain
from worker.domain import (
    PRICE_PER_IMAGE_MICROS,
    EditRequest,
    Job,
    JobState,
    check_key,
    job_id_for_key,
)
from worker.errors import QueueUnavailable

# Re-exported: a producer imports its whole API from this module.
from worker.items import (
    IMAGE_URL_PATTERN,
    ITEM_ENVELOPE_FIELDS,
    MAX_BUDGET_USD,
    MAX_METADATA_BYTES,
    Item,
    check_budget,
    check_metadata,
    item_from_dict,
    new_batch_id,
    new_job_id,
)
from worker.models import average_price_micros
from worker.service import Deps, cancel_job
from worker.store import NEW, JobStore, NewJob, create_call

log = structlog.get_logger("kq.producer")

T = TypeVar("T")

# Jobs are written and queued in chunks: one Redis round trip per chunk, not per job.
ENQUEUE_CHUNK = 500
WAIT_POLL_S = 0.25
# A filtered page of a batch's jobs reads at most this many members of the batch.
PAGE_SCAN_MAX = 5000
# A write's answers whose job is (still) queued: its id goes to the workers (again). A
# set made once: the batch writer looks up 100,000 answers for as many lines.
_SEND_ANSWERS = frozenset((NEW, JobState.QUEUED.value))


@dataclass
class Producer(ChainMethods):
    """Enqueue jobs and read them back. Thread-safe when its adapters are.

    Chains of edits: `enqueue_chain`, `get_chain`, `chain_json`, `cancel_chain`
    (worker/chain_producer.py).
    """

    store: JobStore
    send: Callable[[list[str]], None]
    clock: Callable[[], float] = field(default=time.time)
    # For cancel: the provider client used to delete submitted tasks (best effort).
    deps: Deps | None = None
    # What `close` calls: the closing of each client this producer was built with and
    # owns (`runtime.make_producer` hands its own); adapters shared with others are not here.
    closers: tuple[Callable[[], None], ...] = field(default=(), repr=False)
    chains: ChainStore = field(init=False)

    def __post_init__(self) -> None:
        self.chains = ChainStore(self.store.redis)

    def close(self) -> None:
        """Close the clients this producer owns (`closers`, each one even if another
        fails), once every thread using it is done: a producer dropped without it leaves
        their connections to the garbage collector. Closing twice is harmless."""
        with ExitStack() as closing:
            for close in self.closers:
                closing.callback(close)

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        items: Iterable[Item | ChainItem | EditRequest | Mapping[str, object]],
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
        `keep_job_ids`: the receipt lists the job of every item, in item order (for a
        chain, its first step-1 job).
        """
        batch_id = batch_id or new_batch_id()
        check_key("batch_id", batch_id)
        budget = check_budget(budget_usd)
        if budget is not None:
            self.store.set_batch_fields(batch_id, {"budget_micros": round(budget * 1_000_000)})
        totals = [0, 0, 0]  # created, existing, resent
        job_ids: list[str] | None = [] if keep_job_ids else None

        def settle(written: tuple[int, int, int]) -> None:
            for n, count in enumerate(written):
                totals[n] += count
            if on_chunk is not None:
                on_chunk(BatchReceipt(batch_id, totals[0], totals[1], totals[2]))

        # Chunk n's records are sent to Redis, then chunk n + 1 is validated and its call
        # built here while Redis writes them; then chunk n's answers are read and its
        # messages sent (while Redis is idle, so their round trip is short), and chunk
        # n + 1 is sent. All in one thread: a writer and a sender thread did this overlap
        # before, but each waited for the GIL whenever an answer came back, which cost
        # what the overlap gained.
        # Chunks are written one at a time, in order, each only once it is valid, and each
        # one's messages are sent after its records are written (a worker never gets an
        # id it cannot read). A failure stops the batch as it would in sequence: an
        # earlier chunk's write or send error comes before a later chunk's
        # ValidationError, and a chunk written is reported to `on_chunk` before either is
        # raised. Every message is sent (or deferred) before this returns.
        pending: Callable[[], tuple[int, int, int]] | None = None
        try:
            for chunk in _chunks(items, ENQUEUE_CHUNK):
                coerced = [coerce_item(item) for item in chunk]
                if job_ids is not None:
                    # A chain's entry is its (first) step-1 job, a job like the others.
                    job_ids.extend(
                        i.job_id if isinstance(i, Item) else i.first_jobs()[0][0] for i in coerced
                    )
                start = self._prepare_items(coerced, batch_id)
                if pending is not None:
                    finish, pending = pending, None
                    settle(finish())
                pending = start()
        finally:
            if pending is not None:
                settle(pending())
        created, existing, resent = totals
        ids = None if job_ids is None else tuple(job_ids)
        return BatchReceipt(batch_id, created, existing, resent, ids)

    def _prepare_items(
        self, coerced: Sequence[Item | ChainItem], batch_id: str
    ) -> Callable[[], Callable[[], tuple[int, int, int]]]:
        """Build the write of one validated chunk (its Redis call: no I/O yet). Calling
        what this returns starts the write; calling what that returns finishes it (sends
        its plain jobs, writes and sends its chains) and answers (created, existing,
        resent)."""
        plain = [(i.job_id, i) for i in coerced if isinstance(i, Item)]
        call = create_call(_new_jobs(plain), batch_id=batch_id, now=self.clock())

        def start() -> Callable[[], tuple[int, int, int]]:
            answers = self.store.create_many_started(call)

            def finish() -> tuple[int, int, int]:
                c, e, r = self._settle_chunk(plain, answers(), batch_id)
                # A chain counts as one item: created, or existing (its queued steps resent).
                for chain in (i for i in coerced if isinstance(i, ChainItem)):
                    write = self._write_chain(chain, batch_id)
                    if write.created:
                        c += 1
                    else:
                        e, r = e + 1, r + len(write.to_send)
                return c, e, r

            return finish

        return start

    def _send_deferrable(self, job_ids: list[str]) -> None:
        if not job_ids:
            return
        try:
            self.send(job_ids)
        except QueueUnavailable as exc:
            # The jobs are recorded, queued, with a check on the poll schedule: the
            # poller sends them once the broker is back. The enqueue itself succeeded.
            log.warning("enqueue.send_deferred", jobs=len(job_ids), error=str(exc))

    def _write_chunk(
        self,
        chunk: Sequence[tuple[str, Item]],
        batch_id: str,
    ) -> tuple[int, int, int]:
        answers = self.store.create_many(_new_jobs(chunk), batch_id=batch_id, now=self.clock())
        return self._settle_chunk(chunk, answers, batch_id)

    def _settle_chunk(
        self,
        chunk: Sequence[tuple[str, Item]],
        answers: Sequence[str],
        batch_id: str,
    ) -> tuple[int, int, int]:
        """After a chunk's records are written (the records first, then the messages: a
        worker never gets an id it cannot read): send its queued jobs, count them."""
        to_send = [
            job_id
            for (job_id, _), answer in zip(chunk, answers, strict=True)
            if answer in _SEND_ANSWERS
        ]
        self._send_deferrable(to_send)
        created = answers.count(NEW)
        if batch_id and created:
            # What the batch's new jobs cost if each gets its task, at each one's model's
            # price: its cost is priced by the mean of this (BatchProgress.price_micros).
            estimate = sum(
                item.request.price_micros
                for (_, item), answer in zip(chunk, answers, strict=True)
                if answer == NEW
            )
            self.store.redis.hincrby(keys.batch(batch_id), "estimate_micros", estimate)
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
            price_micros=average_price_micros(
                counts.get("total", 0), counts.get("estimate_micros", 0)
            ),
            paid_micros=counts.get("paid_micros", 0),
            paid_priced=counts.get("paid_priced", 0),
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
        """Cancel every job of a batch that is not terminal yet; returns how many.

        The batch's chains are told to stop first, so that no step completing during the
        walk (a long one: each submitted job costs a provider delete) writes its next."""
        self._stop_chains_of_batch(batch_id)
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
            key = f"redrive:{job.id}"
            if job.chain_id:
                # A chain step: written again in its chain, whose branch (and, if it had
                # ended, the chain itself) reopens; the chain then goes on from there.
                new_id = job_id_for_key(key)
                answer = self.chains.retry_step(job.id, new_id, job.chain_id, now=self.clock())
                if answer in (RETRIED, "exists"):
                    new_ids[job.id] = new_id
                    if answer == RETRIED:
                        self._send_deferrable([new_id])
                continue
            request = EditRequest.from_dict(job.request)
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


def coerce_item(
    value: Item | ChainItem | EditRequest | Mapping[str, object],
) -> Item | ChainItem:
    """An enqueue_batch item: a chain when it is one (it has `steps`), else an edit."""
    if type(value) is Item or isinstance(value, ChainItem):
        return value
    if is_chain(value):
        assert isinstance(value, Mapping)
        return chain_from_dict(value, refused={"batch_id": "give the batch id to the batch"})
    return Item.coerce(value)


def _new_jobs(chunk: Sequence[tuple[str, Item]]) -> list[NewJob]:
    return [
        (job_id, item.request, item.idempotency_key, item.priority, item.metadata)
        for job_id, item in chunk
    ]


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


__all__ = [
    "IMAGE_URL_PATTERN",
    "ITEM_ENVELOPE_FIELDS",
    "MAX_BUDGET_USD",
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
    "new_batch_id",
    "new_job_id",
]
