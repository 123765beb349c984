"""The producer API on a private Redis: idempotency (also across processes), batches,
counters, budgets, cancel, dead letters and redrive. No worker runs here; the queue
is a list that records what would be sent (the Celery side is tested end to end)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
import redis

from tests.conftest import wait_for
from worker.domain import EditRequest, JobState, Reason, job_id_for_key
from worker.errors import ValidationError
from worker.producer import (
    ENQUEUE_CHUNK,
    IMAGE_URL_PATTERN,
    MAX_BUDGET_USD,
    MAX_METADATA_BYTES,
    Item,
    Producer,
    check_metadata,
    item_from_dict,
    job_json,
)
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


def test_a_batch_stops_at_the_first_bad_chunk_with_every_earlier_one_written(
    producer: Producer, sent: Sent
) -> None:
    """A chunk is written while the next is validated; a bad item in the third chunk
    still leaves exactly the first two written, sent and reported."""
    good = [{**REQ, "prompt": f"edit {i}"} for i in range(2 * ENQUEUE_CHUNK)]
    seen: list[int] = []
    with pytest.raises(ValidationError):
        producer.enqueue_batch(
            [*good, {**REQ, "seed": "x"}],
            batch_id="third-bad",
            on_chunk=lambda receipt: seen.append(receipt.created),
        )
    progress = producer.batch_progress("third-bad")
    assert progress is not None and progress.total == 2 * ENQUEUE_CHUNK
    assert len(sent) == 2 * ENQUEUE_CHUNK and seen == [ENQUEUE_CHUNK, 2 * ENQUEUE_CHUNK]


def test_a_write_error_of_a_chunk_stops_the_batch(store: JobStore) -> None:
    """An error of the submit queue (other than its absence) is the caller's, as before."""

    def broken(job_ids: list[str]) -> None:
        raise RuntimeError("broker broke")

    producer = Producer(store=store, send=broken)
    with pytest.raises(RuntimeError, match="broker broke"):
        producer.enqueue_batch([{**REQ, "prompt": f"edit {i}"} for i in range(3 * ENQUEUE_CHUNK)])


def test_a_batch_sends_each_chunk_after_its_records_and_all_before_returning(
    store: JobStore,
) -> None:
    """Each id is sent once its record is readable (the next chunk may be written
    meanwhile), in item order, and every one before the return."""
    sent: list[str] = []
    unreadable: list[str] = []

    def send(job_ids: list[str]) -> None:
        unreadable.extend(
            j for j, job in zip(job_ids, store.get_many(job_ids), strict=True) if job is None
        )
        time.sleep(0.01)  # a slow broker
        sent.extend(job_ids)

    producer = Producer(store=store, send=send)
    items = [Item(EditRequest(f"edit {i}", "https://e.com/x.jpg"), f"k{i}") for i in range(1234)]
    receipt = producer.enqueue_batch(items, batch_id="slow")
    assert receipt.created == 1234 and unreadable == []
    assert sent == [item.job_id for item in items]


def test_a_send_error_stops_the_batch_even_once_its_chunks_are_written(
    store: JobStore,
) -> None:
    """A send that fails once its chunk is written is still the caller's error."""
    calls: list[int] = []

    def broken_later(job_ids: list[str]) -> None:
        calls.append(len(job_ids))
        if len(calls) == 2:
            raise RuntimeError("broker broke")

    producer = Producer(store=store, send=broken_later)
    with pytest.raises(RuntimeError, match="broker broke"):
        producer.enqueue_batch([{**REQ, "prompt": f"edit {i}"} for i in range(2 * ENQUEUE_CHUNK)])


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


# --- issue 12: the producer's own key and metadata, every problem named, budgets ----------


def test_an_item_with_several_problems_names_all_of_them() -> None:
    """Unknown field, missing prompt, bad seed, bad key, bad priority, bad metadata: one
    ValidationError names each; the unknown field's message lists every accepted field."""
    with pytest.raises(ValidationError) as exc:
        item_from_dict(
            {
                "image": "https://e.com/a.jpg",
                "seed": "x",
                "color": "red",
                "idempotency_key": "has space",
                "priority": 5000,
                "metadata": [1],
            }
        )
    fields = {e.field: e.message for e in exc.value.errors}
    assert set(fields) == {"color", "prompt", "seed", "idempotency_key", "priority", "metadata"}
    for name in (
        "prompt", "image", "seed", "guidance_scale", "aspect_ratio",
        "idempotency_key", "priority", "metadata",
    ):  # fmt: skip
        assert name in fields["color"]
    # Item.coerce (the Python API and POST /v1/jobs) also takes batch_id, and says so.
    with pytest.raises(ValidationError) as coerce_exc:
        Item.coerce({**REQ, "colour": 1})
    assert "batch_id" in coerce_exc.value.errors[0].message


def test_image_url_form_is_one_rule() -> None:
    """The image URL form all producers share is the pattern docs/openapi.yaml states."""
    from pathlib import Path

    import yaml

    spec = yaml.safe_load(Path("docs/openapi.yaml").read_text())
    assert spec["components"]["schemas"]["ImageUrl"]["pattern"] == IMAGE_URL_PATTERN
    for good in ("http://a", "https://u:p@cdn.example.com:8443/x/ü.jpg?s=1#f"):
        item_from_dict({**REQ, "image": good})
    for bad in ("HTTP://a", "http://[::1]/x", "http://a\n", "https://e.com/a b", "ftp://a"):
        with pytest.raises(ValidationError) as exc:
            item_from_dict({**REQ, "image": bad})
        assert [e.field for e in exc.value.errors] == ["image"]


def test_metadata_limits() -> None:
    """Metadata is a JSON object of at most 4096 bytes as compact UTF-8 JSON."""
    assert check_metadata(None) is None
    assert check_metadata({"order": 17, "tags": ["a"]}) == {"order": 17, "tags": ["a"]}
    filler = "x" * (MAX_METADATA_BYTES - len('{"k":""}'))
    assert check_metadata({"k": filler}) == {"k": filler}
    for bad in ({"k": filler + "x"}, {"k": "é" * 2100}, [1], "s", {"k": float("nan")},
                {"k": {1, 2}}, {"k": "\ud800"}):  # fmt: skip
        with pytest.raises(ValidationError) as exc:
            check_metadata(bad)
        assert exc.value.errors[0].field == "metadata"


def test_budgets_out_of_range_are_field_errors(producer: Producer) -> None:
    """1e308 once overflowed into micro-dollars (a 500 over HTTP); now a field error."""
    for bad in (1e308, 10**400, float("inf"), float("nan"), -1, True, MAX_BUDGET_USD + 1):
        with pytest.raises(ValidationError) as exc:
            producer.enqueue_batch([REQ], batch_id="money", budget_usd=bad)  # type: ignore[arg-type]
        assert exc.value.errors[0].field == "budget"
    assert producer.batch_progress("money") is None
    producer.enqueue_batch([REQ], batch_id="money", budget_usd=MAX_BUDGET_USD)
    progress = producer.batch_progress("money")
    assert progress is not None and progress.budget_usd == MAX_BUDGET_USD


def test_key_and_metadata_reach_the_job_and_its_event(producer: Producer) -> None:
    """A consumer of kq:events can match a result to its own order without a lookup:
    the event repeats the producer's idempotency key and metadata (absent when none)."""
    from worker.events import decode_event

    meta = {"order": 17, "customer": {"id": "c-9"}, "note": "ünïcode"}
    job_id = producer.enqueue(REQ, idempotency_key="order-17", metadata=meta)
    plain = producer.enqueue(REQ)
    job = producer.get_job(job_id)
    assert job is not None and job.metadata == meta and job.idempotency_key == "order-17"
    data = job_json(job)
    assert data["metadata"] == meta and data["finished_at"] is None
    assert data["submitted_at"] is None and data["seconds"] is None
    assert isinstance(data["attempts"], int) and isinstance(data["created_at"], float)
    assert producer.cancel_job(job_id) and producer.cancel_job(plain)
    events = {f["job_id"]: (i, f) for i, f in producer.store.events()}
    event = decode_event(*events[job_id])
    assert event.idempotency_key == "order-17" and event.metadata == meta
    assert event.to_dict()["metadata"] == meta
    plain_id, plain_fields = events[plain]
    assert "metadata" not in plain_fields and "idempotency_key" not in plain_fields
    assert decode_event(plain_id, plain_fields).metadata is None
    # A redriven job keeps the metadata (the order it serves did not change).
    (new_id,) = producer.redrive([job_id]).values()
    assert producer.get_job(new_id).metadata == meta  # type: ignore[union-attr]


def test_enqueue_one_answers_like_a_batch(producer: Producer) -> None:
    """created 1 / existing 0, then created 0 / existing 1 (resent while still queued)."""
    first = producer.enqueue_one(REQ, idempotency_key="same")
    again = producer.enqueue_one(REQ, idempotency_key="same")
    assert (first.created, first.existing, first.resent) == (1, 0, 0)
    assert (again.created, again.existing, again.resent) == (0, 1, 1)
    assert first.job_ids == again.job_ids == (job_id_for_key("same"),)


def test_batch_receipt_ids_and_pages(producer: Producer) -> None:
    """keep_job_ids gives each item's job in item order; pages walk the batch in order,
    optionally by state, and end with no cursor."""
    items = [{**REQ, "prompt": f"p{i}"} for i in range(7)]
    items.append({**items[2], "idempotency_key": "dup"})
    items.append({**items[3], "idempotency_key": "dup"})  # same key: the same job
    receipt = producer.enqueue_batch(items, batch_id="pages", keep_job_ids=True)
    assert receipt.job_ids is not None and len(receipt.job_ids) == 9
    assert receipt.job_ids[7] == receipt.job_ids[8] == job_id_for_key("dup")
    assert (receipt.created, receipt.existing) == (8, 1)
    assert producer.enqueue_batch(items[:2], batch_id="other").job_ids is None
    seen: list[str] = []
    start: int | None = 0
    while start is not None:
        page, start = producer.batch_jobs_page("pages", start=start, limit=3)
        assert len(page) <= 3
        seen += [j.id for j in page]
    assert seen == list(dict.fromkeys(receipt.job_ids))
    producer.cancel_job(seen[1])
    producer.cancel_job(seen[6])
    cancelled, after = producer.batch_jobs_page("pages", limit=1, state=JobState.CANCELLED)
    assert [j.id for j in cancelled] == [seen[1]] and after == 2
    rest, after = producer.batch_jobs_page("pages", start=after, state=JobState.CANCELLED)
    assert [j.id for j in rest] == [seen[6]] and after is None
    assert producer.batch_jobs_page("nope") == ([], None)


def test_a_task_the_provider_no_longer_knows_fails_at_once(
    store: JobStore, settings: Settings
) -> None:
    """A submitted job whose task answers 404 (here: the simulator restarted and forgot
    it) is failed `task_not_found` by its first poll, not polled until the deadline."""
    from dataclasses import replace

    from tests.support import Clock
    from wavespeed_sim.config import SimConfig
    from wavespeed_sim.server import SimServer
    from worker.poller import sweep

    sim = SimServer(SimConfig(port=0, seed=3, inference_time_s=3600.0, queue_delay_s=0.0))
    sim.start()
    try:
        client = WaveSpeedClient(sim.url, "sim-key", timeout_s=5)
        clock = Clock()
        deps = Deps(
            store=store,
            provider=client,
            settings=replace(settings, wavespeed_base_url=sim.url, job_deadline_s=3600),
            clock=clock,
        )
        producer = Producer(store=store, send=lambda ids: None, deps=deps)
        job_id = producer.enqueue(REQ, idempotency_key="lost-1", metadata={"order": 1})
        assert submit_job(deps, job_id).outcome.value == "submitted"
        job = store.get(job_id)
        assert job is not None and job.state is JobState.SUBMITTED
        import httpx

        httpx.post(f"{sim.url}/_sim/reset", timeout=5).raise_for_status()  # tasks forgotten
        clock.advance(settings.poll_after_s + 1)  # due, and far from the deadline
        report = sweep(deps)
        assert report.outcomes["task_not_found"] == 1
        job = store.get(job_id)
        assert job is not None and job.state is JobState.FAILED
        assert job.reason == "task_not_found" == Reason.TASK_NOT_FOUND.value
        assert job.resolved_by == "poll" and job.prediction_id in job.error
        (event,) = [f for _, f in store.events() if f["job_id"] == job_id]
        assert event["reason"] == "task_not_found" and event["idempotency_key"] == "lost-1"
        client.close()
    finally:
        sim.stop()


def test_an_enqueue_while_the_broker_is_away_is_sent_by_the_poller_later(
    store: JobStore, settings: Settings
) -> None:
    """`make chaos --seed 23`: a Redis restart made the Celery send raise after the jobs
    were written. The enqueue still succeeds (the records are the truth), and the queued
    jobs' check on the poll schedule sends them once the broker is back."""
    from worker.errors import QueueUnavailable
    from worker.poller import sweep
    from worker.store import QUEUED_CHECK_S

    def broker_down(job_ids: list[str]) -> None:
        raise QueueUnavailable("broker unreachable (OperationalError)")

    resent: list[str] = []
    now = [1000.0]
    deps = Deps(
        store=store,
        provider=WaveSpeedClient("http://127.0.0.1:9", "k"),
        settings=settings,
        clock=lambda: now[0],
        enqueue_submit=resent.append,
    )
    producer = Producer(store=store, send=broker_down, deps=deps, clock=lambda: now[0])
    other = {**REQ, "prompt": "make it red"}
    receipt = producer.enqueue_batch([REQ, other], batch_id="b")
    assert receipt.created == 2
    ids = producer.batch_jobs("b")
    assert [j.state for j in ids] == [JobState.QUEUED, JobState.QUEUED]
    now[0] += QUEUED_CHECK_S + 1
    sweep(deps)
    assert sorted(resent) == sorted(j.id for j in ids)


def test_a_made_producer_closes_the_clients_it_owns(
    redis_client: redis.Redis, settings: Settings
) -> None:
    """`make_producer`'s producer owns its Redis and provider clients: leaving its `with`
    closes both (Redis sees the connection go); closing again is harmless."""
    from worker.runtime import make_producer

    def connections() -> int:
        return len(redis_client.client_list())

    alone = connections()
    with make_producer(settings) as made:
        assert made.deps is not None
        http = made.deps.provider._http  # the provider client's httpx client
        made.store.redis.ping()
        assert connections() == alone + 1 and not http.is_closed
    wait_for(lambda: connections() == alone)
    assert http.is_closed
    made.close()
