"""The Redis job store on a real (private) redis-server: atomic, forward-only moves."""

from __future__ import annotations

import json
import threading

import redis
from hypothesis import example, given
from hypothesis import strategies as st

from worker import keys
from worker.domain import EditRequest, JobState, TransitionOutcome
from worker.store import REMOVE, JobStore, create_call, decode_request, encode_request

REQ = EditRequest(prompt="make it blue", image="https://example.com/a.jpg")
PID = "0123456789abcdef0123456789abcdef"
OTHER_PID = "fedcba9876543210fedcba9876543210"


def submitted_job(store: JobStore, job_id: str = "job1", batch_id: str = "") -> None:
    assert store.create(job_id, REQ, batch_id=batch_id, now=100.0)
    assert store.transition(job_id, JobState.SUBMITTING, now=101.0).applied
    assert store.transition(
        job_id,
        JobState.SUBMITTED,
        now=102.0,
        fields={"prediction_id": PID, "submitted_at": 102.0},
        expect_prediction_id=PID,
        poll_at=200.0,
    ).applied


def complete(store: JobStore, job_id: str, pid: str = PID, by: str = "webhook"):  # type: ignore[no-untyped-def]
    return store.transition(
        job_id,
        JobState.COMPLETED,
        now=150.0,
        fields={
            "prediction_id": pid,
            "outputs": json.dumps(["https://o/1.jpeg"]),
            "resolved_by": by,
        },
        expect_prediction_id=pid,
        poll_at=REMOVE,
    )


def test_create_is_idempotent(store: JobStore) -> None:
    """Creating an existing id changes nothing and reports False."""
    assert store.create("job1", REQ, now=1.0)
    store.transition("job1", JobState.SUBMITTING, now=2.0)
    assert not store.create("job1", REQ, now=3.0)
    job = store.get("job1")
    assert job is not None and job.state is JobState.SUBMITTING and job.created_at == 1.0


def test_terminal_move_appends_exactly_one_event(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """completed writes the result, one event with the documented fields, a TTL, no poll entry."""
    submitted_job(store, batch_id="b1")
    assert redis_client.zscore(keys.POLL, "job1") == 200.0
    result = complete(store, "job1")
    assert result.applied and result.state == "completed"
    events = store.events()
    assert len(events) == 1
    fields = events[0][1]
    assert fields["job_id"] == "job1" and fields["batch_id"] == "b1"
    assert fields["state"] == "completed" and fields["prediction_id"] == PID
    assert json.loads(fields["outputs"]) == ["https://o/1.jpeg"]
    assert fields["resolved_by"] == "webhook" and fields["schema"] == "2"
    for key in ("error", "reason", "created_at", "submitted_at", "finished_at", "attempts"):
        assert key in fields
    assert redis_client.zscore(keys.POLL, "job1") is None
    assert 0 < redis_client.ttl("kq:job:job1") <= 3600
    assert store.batch_counts("b1")["completed"] == 1


def test_duplicates_and_contradictions_after_terminal_change_nothing(store: JobStore) -> None:
    """A second completed, a late failed, a cancel: all rejected; still one event."""
    submitted_job(store)
    assert complete(store, "job1").applied
    before = store.get("job1")
    assert complete(store, "job1", by="poll").outcome == "rejected"
    late_failed = store.transition(
        "job1", JobState.FAILED, now=160.0, fields={"error": "late"}, expect_prediction_id=PID
    )
    assert late_failed.outcome == "rejected"
    assert store.transition("job1", JobState.CANCELLED, now=170.0).outcome == "rejected"
    assert store.get("job1") == before
    assert len(store.events()) == 1


def test_result_for_another_prediction_is_a_mismatch(store: JobStore) -> None:
    """A delivery naming a different prediction id than the job's changes nothing."""
    submitted_job(store)
    assert complete(store, "job1", pid=OTHER_PID).outcome == "mismatch"
    job = store.get("job1")
    assert job is not None and job.state is JobState.SUBMITTED
    assert store.events() == []


def test_adopting_a_prediction_owned_by_another_job_is_refused(store: JobStore) -> None:
    """A job still `submitting` cannot take a prediction id that belongs to another job."""
    submitted_job(store, "owner")
    store.create("other", REQ, now=1.0)
    store.transition("other", JobState.SUBMITTING, now=2.0)
    assert complete(store, "other", pid=PID).outcome == "mismatch"
    assert store.job_for_prediction(PID) == "owner"


def test_version_guard(store: JobStore) -> None:
    """A move conditioned on a stale version is a conflict."""
    store.create("job1", REQ, now=1.0)
    first = store.transition("job1", JobState.SUBMITTING, now=2.0, expect_version=1)
    assert first.applied and first.version == 2
    assert (
        store.transition("job1", JobState.QUEUED, now=3.0, expect_version=1).outcome == "conflict"
    )
    assert store.transition("job1", JobState.QUEUED, now=3.0, expect_version=2).applied


def test_missing_job(store: JobStore) -> None:
    """A move on an unknown (or expired) job reports missing and creates nothing."""
    assert complete(store, "ghost").outcome == "missing"
    assert store.get("ghost") is None


def test_racing_results_give_one_event(store: JobStore) -> None:
    """Many threads delivering completed/failed at once: exactly one wins, one event."""
    submitted_job(store)
    barrier = threading.Barrier(16)
    outcomes: list[str] = []

    def deliver(i: int) -> None:
        barrier.wait()
        target = JobState.COMPLETED if i % 2 else JobState.FAILED
        fields = {"outputs": json.dumps(["https://o/1.jpeg"])} if i % 2 else {"error": "x"}
        res = store.transition(
            "job1", target, now=150.0 + i, fields=fields, expect_prediction_id=PID
        )
        outcomes.append(res.outcome)

    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("applied") == 1
    assert len(store.events()) == 1


def test_claim_due_reschedules_with_backoff(store: JobStore, redis_client: redis.Redis) -> None:
    """A sweep takes only due jobs and pushes each one's next poll back, doubling."""
    submitted_job(store, "a")
    store.create("b", REQ, now=1.0)
    store.schedule_poll("b", 10_000.0)
    assert store.claim_due(300.0, limit=10, min_interval=2, max_interval=60) == ["a"]
    assert redis_client.zscore(keys.POLL, "a") == 302.0
    assert store.claim_due(301.0, limit=10, min_interval=2, max_interval=60) == []
    assert store.claim_due(302.0, limit=10, min_interval=2, max_interval=60) == ["a"]
    assert redis_client.zscore(keys.POLL, "a") == 306.0


def test_poll_interval_doubles_and_caps(store: JobStore, redis_client: redis.Redis) -> None:
    """Polls back off from 2 s, never faster, up to the cap (claim_due.lua keeps the one
    back-off there is)."""

    def poll_interval(n: int, minimum: float, maximum: float) -> float:
        # The interval claim_due gives a job polled n times before.
        store.schedule_poll("c", 0.0)
        redis_client.hset(keys.job("c"), mapping={"id": "c", "state": "submitted"})
        redis_client.hset(keys.job("c"), "poll_count", n)
        assert store.claim_due(1000.0, limit=10, min_interval=minimum, max_interval=maximum)
        return float(redis_client.zscore(keys.POLL, "c") or 0) - 1000.0

    assert [poll_interval(n, 2, 60) for n in range(7)] == [2, 4, 8, 16, 32, 60, 60]


def test_claim_due_takes_only_the_limit_and_puts_every_claimed_job_back(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """A sweep over more due jobs than one ZADD takes at once (claim_due.lua adds them back
    400 at a time): exactly `limit` are claimed, earliest first, each rescheduled; the
    rest stay due where they were, and a gone record among them is dropped."""
    ids = [f"j{i:04d}" for i in range(1000)]
    for i, job_id in enumerate(ids):
        redis_client.hset(keys.job(job_id), mapping={"state": "submitted"})
        store.schedule_poll(job_id, 1.0 + i / 1000)
    redis_client.delete(keys.job("j0007"))
    claimed = store.claim_due(100.0, limit=901, min_interval=2, max_interval=60)
    assert claimed == [job_id for job_id in ids[:901] if job_id != "j0007"]
    schedule = dict(redis_client.zrange(keys.POLL, 0, -1, withscores=True))
    assert len(schedule) == 999 and "j0007" not in schedule
    assert all(schedule[job_id] == 102.0 for job_id in claimed)
    assert [schedule[job_id] for job_id in ids[901:]] == [1.0 + i / 1000 for i in range(901, 1000)]


def test_claim_due_drops_expired_records(store: JobStore, redis_client: redis.Redis) -> None:
    """A scheduled id whose record is gone is removed, not resurrected."""
    store.schedule_poll("gone", 1.0)
    assert store.claim_due(5.0, limit=10, min_interval=2, max_interval=60) == []
    assert redis_client.zcard(keys.POLL) == 0
    assert not redis_client.exists("kq:job:gone")


def test_webhook_id_counts_as_seen_only_with_its_result_applied(store: JobStore) -> None:
    """Dedupe and apply are one step: a delivery id is marked exactly when its move is
    applied (or found stale), and a redelivery of it then changes nothing."""
    submitted_job(store)
    assert not store.webhook_seen("w1")
    first = store.transition(
        "job1",
        JobState.COMPLETED,
        now=150.0,
        fields={"prediction_id": PID, "outputs": "[]"},
        expect_prediction_id=PID,
        poll_at=REMOVE,
        webhook_id="w1",
    )
    assert first.outcome is TransitionOutcome.APPLIED and store.webhook_seen("w1")
    again = store.transition(
        "job1", JobState.FAILED, now=151.0, expect_prediction_id=PID, webhook_id="w1"
    )
    assert again.outcome is TransitionOutcome.DUPLICATE and again.state == "completed"
    stale = store.transition(
        "job1", JobState.FAILED, now=152.0, expect_prediction_id=PID, webhook_id="w2"
    )
    assert stale.outcome is TransitionOutcome.REJECTED and store.webhook_seen("w2")
    assert len(store.events()) == 1


def test_open_submit_attempts_close_when_the_task_is_known(store: JobStore) -> None:
    """A submit is an open attempt from `submitting` until its prediction id is recorded,
    or until it is known to have created no task; a lost answer keeps it open."""
    for job_id in ("a", "b", "c"):
        store.create(job_id, REQ, now=1.0)
        store.transition(job_id, JobState.SUBMITTING, now=10.0, fields={"attempts": 1})
    assert {m for m, _ in store.open_attempts(0, 100)} == {"a:1", "b:1", "c:1"}
    store.transition(
        "a",
        JobState.SUBMITTED,
        now=11.0,
        fields={"prediction_id": PID},
        expect_prediction_id=PID,
    )
    store.transition("b", JobState.QUEUED, now=11.0, attempt_created_no_task=True)
    assert [m for m, _ in store.open_attempts(0, 100)] == ["c:1"]
    store.forget_attempts_before(11.0)
    assert store.open_attempts(0, 100) == []


def test_live_state_gauges(store: JobStore) -> None:
    """kq:stats keeps how many jobs are in each non-terminal state right now."""
    store.create("a", REQ, now=1.0)
    store.create_many([("b", REQ, "", 0), ("c", REQ, "", 0)], now=1.0)
    submitted_job(store, "d")
    stats = store.stats()
    assert stats["now:queued"] == 3 and stats["now:submitted"] == 1
    complete(store, "d")
    stats = store.stats()
    assert stats["now:submitted"] == 0 and stats["state:completed"] == 1
    assert stats["now:submitting"] == 0


def test_a_redis_without_the_script_gets_it_loaded(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """A Redis that lost its scripts (a restart, a failover to a fresh server) still applies
    the move: the script is loaded and run again, once."""
    submitted_job(store)
    redis_client.script_flush()
    assert complete(store, "job1").applied
    assert redis_client.xlen(keys.EVENTS) == 1
    assert complete(store, "job1").outcome is TransitionOutcome.REJECTED


def test_a_started_create_is_written_once_its_answers_are_read(store: JobStore) -> None:
    """create_many_started: the command goes now, the answers come when asked for; a job
    that already existed answers its state, as with create_many."""
    store.create("old", REQ, batch_id="b", now=1.0)
    call = create_call(
        [("old", REQ, "", 0), ("n1", REQ, "k1", 0), ("n2", REQ, "", 5)], batch_id="b", now=2.0
    )
    finish = store.create_many_started(call)
    assert finish() == ["queued", "new", "new"]
    job = store.get("n2")
    assert job is not None and job.priority == 5 and job.batch_id == "b"
    assert store.batch_members("b") == ["old", "n1", "n2"]


def test_a_started_create_on_a_redis_without_the_script_runs_it_once(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """NOSCRIPT ran nothing: the answers come from the script loaded and run again."""
    redis_client.script_flush()
    finish = store.create_many_started(create_call([("a", REQ, "", 0), ("b", REQ, "", 0)], now=1.0))
    assert finish() == ["new", "new"]
    assert store.stats()["now:queued"] == 2


def test_a_started_create_whose_connection_is_lost_is_run_again(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """The connection is cut after the command was sent, before Redis ran it (writes are
    paused meanwhile): reading the answers runs the call again, and every job is written
    once, counted once by its batch and the gauges."""
    ids = [f"j{i}" for i in range(50)]
    redis_client.client_pause(10_000, all=False)
    try:
        finish = store.create_many_started(
            create_call([(i, REQ, "", 0) for i in ids], batch_id="cut", now=1.0)
        )
        assert redis_client.client_kill_filter(_type="normal", skipme=True) >= 1
    finally:
        redis_client.client_unpause()
    assert finish() == ["new"] * len(ids)
    assert store.batch_members("cut") == ids
    assert int(redis_client.hget(keys.batch("cut"), "total") or 0) == len(ids)
    assert store.stats()["now:queued"] == len(ids)
    assert all(job is not None and job.state is JobState.QUEUED for job in store.get_many(ids))


@given(prompt=st.text(), image=st.text())
@example(prompt='quo"te\\ \t\n\x7f ü 😀', image='https://e.com/a.jpg?q="x"')
def test_a_plain_request_is_stored_as_the_json_encoder_writes_it(prompt: str, image: str) -> None:
    """The usual edit's stored form is built without the encoder: the same text."""
    request = EditRequest.plain(prompt, image)
    call = create_call([("j", request, "", 0)], now=1.0)
    assert call.args[4] == encode_request(request.to_payload())
    assert decode_request(str(call.args[4])) == {"prompt": prompt, "image": image}
