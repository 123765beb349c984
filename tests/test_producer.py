"""The producer API on a private Redis: idempotency (also across processes), batches,
counters, budgets, cancel, dead letters and redrive. No worker runs here; the queue
is a list that records what would be sent (the Celery side is tested end to end)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from worker.domain import EditRequest, JobState, job_id_for_key
from worker.errors import ValidationError
from worker.producer import Item, Producer
from worker.service import Deps, cancel_job, submit_job
from worker.settings import Settings
from worker.store import JobStore
from worker.wavespeed import WaveSpeedClient

REQ = {"prompt": "make it blue", "image": "https://example.com/a.jpg"}


class Sent(list[str]):
    def __call__(self, job_ids: list[str]) -> None:
        self.extend(job_ids)


@pytest.fixture
def sent() -> Sent:
    return Sent()


@pytest.fixture
def producer(store: JobStore, sent: Sent, settings: Settings) -> Producer:
    # Nothing listens on this port: a cancel's provider delete fails quietly (best effort).
    deps = Deps(store=store, provider=WaveSpeedClient("http://127.0.0.1:9", "k"), settings=settings)
    return Producer(store=store, send=sent, deps=deps)


def test_same_idempotency_key_twice_is_one_job(producer: Producer, sent: Sent) -> None:
    """The second enqueue with a key returns the first job and writes nothing new."""
    first = producer.enqueue({**REQ, "idempotency_key": "order-17"})
    second = producer.enqueue(REQ, idempotency_key="order-17")
    assert first == second == job_id_for_key("order-17")
    assert producer.store.stats()["now:queued"] == 1
    job = producer.get_job(first)
    assert job is not None and job.idempotency_key == "order-17"
    # Still queued, so the id was handed to the workers again (harmless: submit is idempotent).
    assert sent == [first, first]


def test_a_key_of_a_job_already_submitted_sends_nothing(producer: Producer, sent: Sent) -> None:
    """Once a job has left `queued`, re-enqueueing its key neither writes nor sends."""
    job_id = producer.enqueue(REQ, idempotency_key="k1")
    producer.store.transition(job_id, JobState.SUBMITTING, now=time.time())
    sent.clear()
    assert producer.enqueue(REQ, idempotency_key="k1") == job_id
    assert sent == []


def test_two_processes_racing_on_the_same_keys(redis_url: str, store: JobStore) -> None:
    """Two processes enqueue the same 300 keys at once: 300 jobs, each created once."""
    script = textwrap.dedent(
        f"""
        import json, redis, sys, time
        from worker.producer import Producer
        from worker.store import JobStore
        client = redis.Redis.from_url({redis_url!r}, decode_responses=True)
        store = JobStore(client, result_ttl_s=3600, events_maxlen=10_000)
        producer = Producer(store=store, send=lambda ids: None)
        while not client.exists("go"):
            time.sleep(0.001)
        receipt = producer.enqueue_batch(
            ({{"prompt": "p", "image": "https://e.com/i.jpg", "idempotency_key": f"k{{i}}"}}
             for i in range(300)), batch_id="race")
        print(json.dumps([receipt.created, receipt.existing]))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    store.redis.set("go", "1")
    results = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    created = [int(r.strip()[1:-1].split(",")[0]) for r in results]
    assert sum(created) == 300
    assert store.batch_counts("race")["total"] == 300
    assert len(store.batch_members("race")) == 300
    assert len(store.redis.keys("kq:job:*")) == 300


def test_batch_counters_and_progress(producer: Producer) -> None:
    """A batch counts its jobs by state; progress reports totals, cost and completion."""
    receipt = producer.enqueue_batch([REQ] * 7, batch_id="b1")
    assert (receipt.created, receipt.existing) == (7, 0)
    ids = producer.store.batch_members("b1")
    assert len(ids) == 7
    progress = producer.batch_progress("b1")
    assert progress is not None and progress.total == 7 and progress.queued == 7
    store = producer.store
    store.transition(ids[0], JobState.SUBMITTING, now=time.time())
    store.transition(
        ids[0],
        JobState.SUBMITTED,
        now=time.time(),
        fields={"prediction_id": "a" * 32},
        expect_prediction_id="a" * 32,
    )
    store.transition(ids[1], JobState.CANCELLED, now=time.time())
    progress = producer.batch_progress("b1")
    assert progress is not None
    assert (progress.queued, progress.in_flight, progress.cancelled) == (5, 1, 1)
    assert progress.paid == 1 and progress.cost_usd == 0.08
    assert not progress.done
    assert producer.batch_progress("nope") is None


def test_an_invalid_item_stops_its_chunk(producer: Producer, sent: Sent) -> None:
    """A bad request raises with its field named, and nothing of its chunk is written."""
    with pytest.raises(ValidationError) as exc:
        producer.enqueue_batch([REQ, {**REQ, "seed": "x"}], batch_id="bad")
    assert exc.value.errors[0].field == "seed"
    assert producer.batch_progress("bad") is None and sent == []


def test_cancel_before_submit_means_never_submitted(
    producer: Producer, store: JobStore, settings: Settings
) -> None:
    """A queued job that is cancelled is skipped by the submit: no provider call at all."""
    job_id = producer.enqueue(REQ)
    assert producer.cancel_job(job_id)
    assert not producer.cancel_job(job_id)  # already terminal
    calls: list[str] = []

    def refuse(request: object) -> object:
        calls.append(str(request))
        raise AssertionError("the provider must not be called")

    import httpx

    deps = Deps(
        store=store,
        provider=WaveSpeedClient("http://sim", "k", transport=httpx.MockTransport(refuse)),  # type: ignore[arg-type]
        settings=settings,
    )
    assert submit_job(deps, job_id).outcome.value == "skipped"
    assert calls == []
    job = store.get(job_id)
    assert job is not None and job.state is JobState.CANCELLED
    assert job.reason == "cancelled_by_user" and job.resolved_by == "user"
    (event,) = [f for _, f in store.events() if f["job_id"] == job_id]
    assert event["state"] == "cancelled"
    assert cancel_job(deps, job_id).outcome == "rejected"


def test_cancel_batch_cancels_only_unfinished_jobs(producer: Producer) -> None:
    """Cancelling a batch leaves finished jobs alone and counts what it cancelled."""
    producer.enqueue_batch([REQ] * 5, batch_id="c1")
    ids = producer.store.batch_members("c1")
    producer.store.transition(ids[0], JobState.FAILED, now=time.time())
    assert producer.cancel_batch("c1") == 4
    progress = producer.batch_progress("c1")
    assert progress is not None and progress.done and progress.cancelled == 4


def test_budget_reservation_is_once_per_job(producer: Producer) -> None:
    """A budget of $0.16 lets exactly two jobs through, however often each one asks."""
    producer.enqueue_batch([REQ] * 3, batch_id="money", budget_usd=0.16)
    a, b, c = producer.store.batch_members("money")
    store = producer.store
    assert store.reserve_budget(a, "money", 80_000)
    assert store.reserve_budget(a, "money", 80_000)  # a retry of the same job
    assert store.reserve_budget(b, "money", 80_000)
    assert not store.reserve_budget(c, "money", 80_000)
    progress = producer.batch_progress("money")
    assert progress is not None and progress.budget_usd == 0.16


def test_dead_letters_and_idempotent_redrive(producer: Producer, sent: Sent) -> None:
    """Failed jobs are listed with their reason; redriving twice makes one new job."""
    ids = [producer.enqueue(REQ) for _ in range(3)]
    store = producer.store
    store.transition(ids[0], JobState.FAILED, now=time.time(), fields={"reason": "deadline"})
    store.transition(ids[1], JobState.FAILED, now=time.time() + 1, fields={"reason": "nsfw"})
    letters = producer.dead_letters()
    assert [j.id for j in letters] == [ids[1], ids[0]]
    assert [j.id for j in producer.dead_letters(reason="deadline")] == [ids[0]]
    first = producer.redrive([ids[0], ids[2]])  # ids[2] is queued: not redriven
    assert list(first) == [ids[0]]
    again = producer.redrive([ids[0]])
    assert again == first
    new_job = producer.get_job(first[ids[0]])
    assert new_job is not None and new_job.state is JobState.QUEUED
    assert new_job.request == producer.get_job(ids[0]).request  # type: ignore[union-attr]
    assert [j.id for j in producer.dead_letters()] == [ids[1]]


def test_item_coercion() -> None:
    """Items come from mappings, requests or Items; keys give stable job ids."""
    item = Item.coerce({**REQ, "idempotency_key": "x"})
    assert item.job_id == job_id_for_key("x") == Item.coerce(item).job_id
    plain = Item.coerce(EditRequest(**REQ))  # type: ignore[arg-type]
    assert plain.job_id == plain.job_id  # fixed once made
    assert Item.coerce(EditRequest(**REQ)).job_id != plain.job_id  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Item.coerce({**REQ, "idempotency_key": "has space"})
