"""The admission dispatcher: a thread in each worker process that hands waiting jobs
to the submit pool as provider slots free up.

It blocks on the wake list the Lua transition pushes to whenever a slot is released,
so a freed slot is refilled within a round trip, not on the next beat tick. Several
dispatchers (one per worker process, on any number of machines) can run at once: a
claim is one atomic Lua call, so no job is handed out twice.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import redis
import structlog

from worker.service import Deps, SubmitOutcome, SubmitResult
from worker.service.submit import submit_jobs

log = structlog.get_logger("kq.dispatcher")

# At most this many jobs are claimed per round (and so queued on the submit pool).
CLAIM_BATCH = 64
REDIS_TROUBLE_PAUSE_S = 1.0


def dispatch_forever(
    deps: Deps,
    pool: ThreadPoolExecutor,
    stop: threading.Event,
    retry_later: Callable[[str], None],
) -> None:
    """Claim waiting jobs and submit them until `stop` is set."""
    admission = deps.admission
    if admission is None:
        return
    log.info(
        "dispatcher.start",
        max_in_flight=admission.max_in_flight,
        max_submits_per_minute=admission.max_per_minute,
    )
    while not stop.is_set():
        try:
            job_ids, wait_s = admission.claim(CLAIM_BATCH, deps.clock())
            if not job_ids:
                admission.wait_for_wake(wait_s)
                continue
        except redis.RedisError as exc:
            log.warning("dispatcher.redis_error", error=type(exc).__name__)
            stop.wait(REDIS_TROUBLE_PAUSE_S)
            continue
        except Exception as exc:  # never let the thread die: waiting jobs depend on it
            log.error("dispatcher.error", error=repr(exc))
            stop.wait(REDIS_TROUBLE_PAUSE_S)
            continue
        try:
            futures = submit_jobs(deps, job_ids, pool, slot_held=True)
        except Exception as exc:
            # Reading the claimed jobs failed (Redis away): each is retried alone, and
            # one whose retry is lost goes back in line when its claim lease runs out.
            log.error("dispatcher.submit_crashed", jobs=len(job_ids), error=repr(exc))
            for job_id in job_ids:
                _retry(job_id, retry_later)
            stop.wait(REDIS_TROUBLE_PAUSE_S)
            continue
        for job_id, future in zip(job_ids, futures, strict=True):
            future.add_done_callback(_after(job_id, retry_later))


def _after(
    job_id: str, retry_later: Callable[[str], None]
) -> Callable[[Future[SubmitResult]], None]:
    def done(future: Future[SubmitResult]) -> None:
        try:
            result = future.result()
        except Exception as exc:  # the submit raised (e.g. Redis down): try again later
            log.error("dispatcher.submit_crashed", job_id=job_id, error=repr(exc))
            _retry(job_id, retry_later)
            return
        if result.outcome is SubmitOutcome.RETRY:
            _retry(job_id, retry_later)

    return done


def _retry(job_id: str, retry_later: Callable[[str], None]) -> None:
    # Sending the retry needs the broker, which may be the Redis that just went away; an
    # error raised here would vanish in the executor's callback machinery. The job is not
    # lost: the poller's check of a job left queued or submitting sends or settles it.
    try:
        retry_later(job_id)
    except Exception as exc:
        log.warning("dispatcher.retry_not_sent", job_id=job_id, error=repr(exc))


def start(
    deps: Deps, pool: ThreadPoolExecutor, retry_later: Callable[[str], None]
) -> threading.Event:
    """Run the dispatcher in a daemon thread; set the returned event to stop it."""
    stop = threading.Event()
    thread = threading.Thread(
        target=dispatch_forever,
        args=(deps, pool, stop, retry_later),
        name="kq-dispatcher",
        daemon=True,
    )
    thread.start()
    return stop
