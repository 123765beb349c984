"""Celery tasks: thin wrappers that decode, bind log context and call the service."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, ThreadPoolExecutor
from typing import Any

import structlog
from celery import Task
from kombu.exceptions import OperationalError

from worker import poller, telemetry
from worker.celery_app import SUBMIT_QUEUE, app
from worker.drain import Drain
from worker.errors import ConfigError, QueueUnavailable
from worker.outputs import Copier, make_copier
from worker.outputs.copier import COPY_THREADS
from worker.service import Deps, SubmitOutcome, submit_job
from worker.service.submit import submit_jobs

log = structlog.get_logger("kq.tasks")

RETRY_BASE_S = 1.0
RETRY_CAP_S = 60.0

# Jobs per `kq.submit_chunk` message, and the threads one chunk submits with.
CHUNK_SIZE = 100
CHUNK_THREADS = 16

_deps: Deps | None = None
_poll_pool: ThreadPoolExecutor | None = None
_chunk_pool: ThreadPoolExecutor | None = None
# The chunks' submits not finished yet, handed back when the worker drains (SIGTERM).
_drain = Drain()
# Copy-out (kq.copy_outputs): built on first use, from this process's settings.
_copier: Copier | None = None
_copy_pool: ThreadPoolExecutor | None = None
_copy_lock = threading.Lock()


def install(deps: Deps) -> None:
    """Hand this process's adapters to the task bodies (`kq worker` does, before it starts).

    The submits' counters are summed in memory and written a few times a second
    (telemetry.Buffered), not in a round trip of their own per job."""
    global _deps
    if deps.counter is None:
        deps.counter = telemetry.Buffered(deps.store.redis).start()
    _deps = deps


def process_deps() -> Deps:
    if _deps is None:
        raise ConfigError("the Celery tasks have no adapters: start workers with `kq worker`")
    return _deps


def retry_countdown(retries: int) -> float:
    """Exponential back-off with jitter: ~1, 2, 4 ... capped at a minute."""
    ceiling = min(RETRY_CAP_S, RETRY_BASE_S * (2**retries))
    return random.uniform(ceiling / 2, ceiling)


@app.task(name="kq.submit", bind=True, acks_late=True, max_retries=None)
def submit(self: Task[Any, Any], job_id: str) -> str:
    """Submit one job; transient errors come back here as a Celery retry."""
    if not isinstance(job_id, str) or not job_id:
        log.error("submit.bad_message", job_id=repr(job_id))
        return "bad_message"
    deps = process_deps()
    retries = int(self.request.retries or 0)
    with structlog.contextvars.bound_contextvars(job_id=job_id, task_retries=retries):
        final = retries >= deps.settings.submit_max_retries
        result = submit_job(deps, job_id, final_attempt=final)
        if result.outcome is SubmitOutcome.RETRY:
            raise self.retry(countdown=retry_countdown(retries), max_retries=None)
        return result.outcome.value


@app.task(name="kq.poll_due", acks_late=True, ignore_result=True)
def poll_due() -> dict[str, int]:
    """One polling sweep over the jobs that are due (scheduled by `kq beat`)."""
    global _poll_pool
    if _poll_pool is None:
        _poll_pool = ThreadPoolExecutor(poller.POLL_THREADS, thread_name_prefix="kq-poll")
    report = poller.sweep(process_deps(), _poll_pool)
    return {"claimed": report.claimed, **report.outcomes}


@app.task(name="kq.submit_chunk", acks_late=True)
def submit_chunk(job_ids: list[str]) -> dict[str, int]:
    """Submit a chunk of jobs side by side over the client's pooled connections.

    One message per chunk keeps the per-job cost below a Celery task's, and the chunk's
    records and budgets are read and reserved in a round trip or two (`submit_jobs`). A
    job that meets a transient error leaves the chunk and retries alone as `kq.submit`.
    """
    if not isinstance(job_ids, list) or not all(isinstance(j, str) and j for j in job_ids):
        log.error(
            "submit_chunk.bad_message", size=len(job_ids) if isinstance(job_ids, list) else -1
        )
        return {"bad_message": 1}
    deps = process_deps()
    futures = submit_jobs(deps, job_ids, submit_pool())
    _drain.track(zip(futures, job_ids, strict=True))
    counts: dict[str, int] = {}
    try:
        for job_id, future in zip(job_ids, futures, strict=True):
            try:
                result = future.result()
            except CancelledError:  # the worker is draining: handed back, unstarted
                counts["handed_back"] = counts.get("handed_back", 0) + 1
                continue
            counts[result.outcome.value] = counts.get(result.outcome.value, 0) + 1
            if result.outcome is SubmitOutcome.RETRY:
                submit.apply_async(args=[job_id], queue=SUBMIT_QUEUE, countdown=retry_countdown(0))
    finally:
        _drain.forget(futures)
    return counts


@app.task(name="kq.copy_outputs", acks_late=True, ignore_result=True)
def copy_outputs() -> dict[str, int]:
    """One copy-out sweep over completed jobs whose outputs are due (scheduled by beat
    when KQ_OUTPUTS is set; see worker/outputs/)."""
    global _copier, _copy_pool
    deps = process_deps()
    if not deps.settings.keep_outputs:
        return {"claimed": 0}
    with _copy_lock:  # two sweeps starting together on the threads pool build one copier
        if _copier is None:
            _copier = make_copier(deps.store.redis, deps.settings)
        if _copy_pool is None:
            _copy_pool = ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="kq-copy")
        copier, pool = _copier, _copy_pool
    report = copier.sweep(pool)
    return {"claimed": report.claimed, **report.outcomes}


def drain(timeout_s: float, on_timeout: Callable[[], None]) -> None:
    """The worker got SIGTERM: chunks hand back the submits they have not started, and
    `on_timeout` runs if the worker is still here `timeout_s` later (see worker/drain.py)."""
    _drain.begin(_hand_back, timeout_s, on_timeout)


def draining() -> bool:
    return _drain.draining


def _hand_back(job_ids: list[str]) -> None:
    # Each job is still `queued`: it goes back as its own `kq.submit`, for another worker
    # (or this one, started again). If the broker is away, the poller's queued check
    # sends it later.
    for job_id in job_ids:
        try:
            submit.apply_async(args=[job_id], queue=SUBMIT_QUEUE)
        except Exception as exc:
            log.warning("drain.hand_back_failed", job_id=job_id, error=repr(exc))


def submit_pool() -> ThreadPoolExecutor:
    global _chunk_pool
    if _chunk_pool is None:
        _chunk_pool = ThreadPoolExecutor(CHUNK_THREADS, thread_name_prefix="kq-submit")
    return _chunk_pool


def retry_submit_later(job_id: str) -> None:
    """A single job's transient failure: retry it alone, with back-off, as `kq.submit`."""
    submit.apply_async(args=[job_id], queue=SUBMIT_QUEUE, countdown=retry_countdown(0))


def enqueue_submit(job_id: str) -> None:
    """Put one job id on the submit queue; QueueUnavailable when the broker is away."""
    try:
        submit.apply_async(args=[job_id], queue=SUBMIT_QUEUE)
    except OperationalError as exc:
        raise QueueUnavailable(f"broker unreachable ({type(exc).__name__})") from exc


def enqueue_submits(job_ids: list[str]) -> None:
    """Put many job ids on the submit queue: one message per CHUNK_SIZE ids;
    QueueUnavailable when the broker is away (some chunks may have been sent)."""
    if len(job_ids) == 1:
        enqueue_submit(job_ids[0])
        return
    try:
        with app.producer_or_acquire() as producer:
            publish_chunks(job_ids, producer)
    except OperationalError as exc:
        raise QueueUnavailable(f"broker unreachable ({type(exc).__name__})") from exc


def publish_chunks(job_ids: list[str], producer: Any) -> None:
    """Publish `kq.submit_chunk` messages of CHUNK_SIZE ids each with `producer`.

    Each message's `argsrepr` (the arguments as monitoring tools show them) is given a
    short summary, not left to Celery's `saferepr` of up to 100 ids: that repr alone was
    a tenth of a `kq batch`'s CPU.
    """
    for start in range(0, len(job_ids), CHUNK_SIZE):
        ids = job_ids[start : start + CHUNK_SIZE]
        submit_chunk.apply_async(
            args=[ids],
            queue=SUBMIT_QUEUE,
            producer=producer,
            argsrepr=f"[<{len(ids)} job ids: {ids[0]} .. {ids[-1]}>]",
        )
