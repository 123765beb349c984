"""The batched submit path (`submit_jobs`: a chunk's records and budgets in a round trip
each, then each job sent on a pool) against the real simulator and a private Redis:
each job is POSTed at most once, the budget and the provider cap hold, and a record
that moved after the chunk read it is read again."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import replace
from typing import Any

import httpx
import pytest

from tests.support import Clock
from wavespeed_sim.server import SimServer
from worker import telemetry
from worker.admission import Admission
from worker.domain import EditRequest, JobState
from worker.service import Deps, SubmitOutcome
from worker.service.submit import submit_jobs
from worker.settings import Settings
from worker.store import JobStore
from worker.wavespeed import WaveSpeedClient

REQ = EditRequest(prompt="make it blue", image="https://example.com/a.jpg")
BATCH = "chunk"


class Inline(Executor):
    """Runs each submit at once, after `before(job_id)` (a move racing the chunk)."""

    def __init__(self, before: Callable[[str], None] = lambda job_id: None) -> None:
        self.before = before

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.before(args[1].id)  # _send(deps, job, ...)
        future: Future[Any] = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def make_deps(sim: SimServer, store: JobStore, settings: Settings, *, cap: int) -> Deps:
    settings = replace(settings, wavespeed_base_url=sim.url, job_deadline_s=600, max_in_flight=cap)
    return Deps(
        store=store,
        provider=WaveSpeedClient(sim.url, "sim-key", timeout_s=5),
        settings=settings,
        clock=Clock(),
        admission=Admission(store.redis, settings),
    )


@pytest.fixture
def deps(sim: SimServer, store: JobStore, settings: Settings) -> Iterator[Deps]:
    made = make_deps(sim, store, settings, cap=1000)
    yield made
    made.provider.close()


def submits(control: httpx.Client) -> list[dict[str, Any]]:
    data = control.get("/_sim/requests").json()
    entries = data["requests"] if isinstance(data, dict) else data
    return [r for r in entries if r.get("kind") == "submit"]


def queued(store: JobStore, n: int, prefix: str = "j") -> list[str]:
    ids = [f"{prefix}{i}" for i in range(n)]
    store.create_many([(job_id, REQ, "", 0) for job_id in ids], batch_id=BATCH, now=time.time())
    return ids


def outcomes(futures: list[Future[Any]]) -> list[SubmitOutcome]:
    return [f.result().outcome for f in futures]


def test_a_chunk_skips_settled_jobs_keeps_the_budget_and_posts_each_job_once(
    deps: Deps, control: httpx.Client, store: JobStore
) -> None:
    """A budget for three images over four queued jobs, a terminal job and an unknown id:
    three POSTs, one job failed for its budget, the others skipped; telemetry counted."""
    ids = queued(store, 5)
    store.set_batch_fields(BATCH, {"budget_micros": 3 * REQ.price_micros})
    store.transition(ids[4], JobState.CANCELLED, now=time.time())
    chunk = [*ids, "no-such-job"]

    results = outcomes(submit_jobs(deps, chunk, Inline()))

    assert results == [SubmitOutcome.SUBMITTED] * 3 + [
        SubmitOutcome.FAILED,
        SubmitOutcome.SKIPPED,
        SubmitOutcome.SKIPPED,
    ]
    assert len(submits(control)) == 3
    jobs = store.get_many(ids)
    assert [j.state if j else None for j in jobs] == [JobState.SUBMITTED] * 3 + [
        JobState.FAILED,
        JobState.CANCELLED,
    ]
    assert jobs[3] is not None and jobs[3].reason == "budget"
    assert telemetry.totals(store.redis)["submit.submitted"] == 3
    # Sent again (a redelivered message), the chunk POSTs nothing more.
    assert SubmitOutcome.SUBMITTED not in outcomes(submit_jobs(deps, chunk, Inline()))
    assert len(submits(control)) == 3


def test_under_a_cap_part_of_a_chunk_goes_and_the_rest_waits_in_line(
    sim: SimServer, control: httpx.Client, store: JobStore, settings: Settings
) -> None:
    """Two slots for a chunk of five: two POSTs, three jobs in the waiting line, no slot
    held by a job that was not sent; a dispatcher's claim (slot held) sends the next."""
    capped = make_deps(sim, store, settings, cap=2)
    try:
        ids = queued(store, 5)
        results = outcomes(submit_jobs(capped, ids, Inline()))
        assert results == [SubmitOutcome.SUBMITTED] * 2 + [SubmitOutcome.WAITING] * 3
        assert capped.admission is not None
        snap = capped.admission.snapshot(time.time())
        assert (snap.slots_used, snap.waiting) == (2, 3)
        store.transition(ids[0], JobState.CANCELLED, now=time.time())  # frees a slot
        claimed, _ = capped.admission.claim(10, time.time())
        assert claimed == [ids[2]]
        sent = outcomes(submit_jobs(capped, claimed, Inline(), slot_held=True))
        assert sent == [SubmitOutcome.SUBMITTED]
        assert len(submits(control)) == 3
    finally:
        capped.provider.close()


def test_a_chunk_behind_a_full_cap_waits_in_line_without_a_thread(
    sim: SimServer, control: httpx.Client, store: JobStore, settings: Settings
) -> None:
    """With every slot taken, a chunk's jobs all join the waiting line at once: none is
    handed to the pool, nothing is POSTed, and claims then send them in their order."""
    capped = make_deps(sim, store, settings, cap=1)
    try:
        first = queued(store, 1, "first")
        assert outcomes(submit_jobs(capped, first, Inline())) == [SubmitOutcome.SUBMITTED]
        ids = queued(store, 4)

        def no_thread(job_id: str) -> None:
            raise AssertionError(f"{job_id} was handed to the pool")

        results = outcomes(submit_jobs(capped, ids, Inline(before=no_thread)))

        assert results == [SubmitOutcome.WAITING] * 4
        assert len(submits(control)) == 1
        assert capped.admission is not None
        assert capped.admission.snapshot(time.time()).waiting == 4
        sent = []
        for previous in [first[0], *ids[:-1]]:
            store.transition(previous, JobState.CANCELLED, now=time.time())  # frees the slot
            claimed, _ = capped.admission.claim(10, time.time())
            sent += claimed
            assert outcomes(submit_jobs(capped, claimed, Inline(), slot_held=True)) == [
                SubmitOutcome.SUBMITTED
            ]
        assert sent == ids
        assert len(submits(control)) == 5
    finally:
        capped.provider.close()


def test_a_record_that_moved_after_the_chunk_read_it_is_read_again(
    deps: Deps, control: httpx.Client, store: JobStore
) -> None:
    """Between the chunk's read and a job's turn, one job's record is flagged (still
    queued, a new version) and another is cancelled: the first is read again and sent,
    the second is not sent; each POST happens once."""
    ids = queued(store, 3)

    def race(job_id: str) -> None:
        if job_id == ids[0]:
            store.flag(job_id, JobState.QUEUED, {"note": "moved"}, now=time.time())
        elif job_id == ids[1]:
            store.transition(job_id, JobState.CANCELLED, now=time.time())

    results = outcomes(submit_jobs(deps, ids, Inline(before=race)))

    assert results == [SubmitOutcome.SUBMITTED, SubmitOutcome.SKIPPED, SubmitOutcome.SUBMITTED]
    jobs = store.get_many(ids)
    assert [j.state if j else None for j in jobs] == [
        JobState.SUBMITTED,
        JobState.CANCELLED,
        JobState.SUBMITTED,
    ]
    assert len(submits(control)) == 2


def test_budgets_are_reserved_once_even_after_redis_lost_its_scripts(store: JobStore) -> None:
    """The chunk's reservations go out as EVALSHA; with the scripts flushed (as after a
    Redis restart) they are made one by one instead, and a repeat reserves nothing more."""
    ids = queued(store, 3)
    store.set_batch_fields(BATCH, {"budget_micros": 2 * REQ.price_micros})
    store.redis.script_flush()
    items = [(job_id, BATCH, REQ.price_micros, "") for job_id in ids]
    assert store.reserve_budgets(items) == [True, True, False]
    assert store.reserve_budgets(items) == [True, True, False]
    assert store.batch_counts(BATCH)["reserved_micros"] == 2 * REQ.price_micros
