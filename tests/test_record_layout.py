"""The job record's layout (what a job leaves in Redis), on a real redis-server: fields at
their defaults are not stored and read back as defaults; records, prediction ids and
webhook marks written by earlier versions (a key each, every field) still read the same."""

from __future__ import annotations

import json
import re
from importlib import resources

import redis

from tests.support import make_submitted_job
from worker import keys
from worker.domain import EditRequest, JobState, TransitionOutcome
from worker.store import INDEX_PERIOD_S, INDEX_SHARDS, REMOVE, JobStore, index_keys

REQ = EditRequest(prompt="make it blue", image="https://example.com/a.jpg")
PID = "0123456789abcdef0123456789abcdef"
OTHER_PID = "fedcba9876543210fedcba9876543210"


def test_transition_script_uses_the_same_index_buckets() -> None:
    """lua/transition.lua repeats INDEX_PERIOD_S and INDEX_SHARDS."""
    text = resources.files("worker").joinpath("lua", "transition.lua").read_text()
    found = re.search(r"local INDEX_PERIOD_S, INDEX_SHARDS = (\d+), (\d+)", text)
    assert found is not None
    assert (int(found[1]), int(found[2])) == (INDEX_PERIOD_S, INDEX_SHARDS)


def test_a_new_job_stores_no_field_at_its_default(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """No id (it is in the key), no empty key/batch/metadata, no priority 0; the Job read
    back has them all."""
    assert store.create("job1", REQ, now=100.123456)
    raw = redis_client.hgetall(keys.job("job1"))
    assert set(raw) == {"state", "version", "request", "attempts", "created_at", "updated_at"}
    assert raw["created_at"] == "100.123"  # to the millisecond
    # The usual edit (a prompt, one image) as a 2-array; anything else as its JSON object.
    assert json.loads(raw["request"]) == [REQ.prompt, REQ.image]
    job = store.get("job1")
    assert job is not None
    assert (job.id, job.batch_id, job.idempotency_key, job.priority, job.metadata) == (
        "job1",
        "",
        "",
        0,
        None,
    )
    assert job.request == REQ.to_payload()
    [listed] = store.get_many(["job1"])
    assert listed == job
    seeded = EditRequest(prompt="p", image="https://example.com/b.jpg", seed=7)
    assert store.create("job2", seeded, now=100.0)
    assert json.loads(redis_client.hget(keys.job("job2"), "request")) == seeded.to_payload()
    job2 = store.get("job2")
    assert job2 is not None and job2.request == seeded.to_payload()


def test_a_finished_record_keeps_only_what_it_says(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """Empty fields are removed, not written; the price and the last update (its finish)
    go with the terminal move; the event still has every documented field."""
    assert store.create("job1", REQ, batch_id="b1", now=100.0)
    assert store.reserve_budget("job1", "b1", 80000)
    assert store.transition(
        "job1",
        JobState.SUBMITTING,
        now=101.0,
        fields={"submitting_at": 101.0, "price_micros": 80000, "attempts": 1},
    ).applied
    assert store.transition(
        "job1",
        JobState.SUBMITTED,
        now=102.0,
        fields={"prediction_id": PID, "submitted_at": 102.0, "ambiguous": "0"},
        expect_prediction_id=PID,
    ).applied
    assert store.stats()["paid_micros"] == 80000
    result = store.transition(
        "job1",
        JobState.COMPLETED,
        now=150.5,
        fields={
            "prediction_id": PID,
            "outputs": json.dumps(["https://o/1.jpeg"]),
            "error": "",
            "reason": "",
            "task_code": "",
            "resolved_by": "webhook",
            "finished_at": 150.5,
        },
        expect_prediction_id=PID,
        poll_at=REMOVE,
        webhook_id="w1",
    )
    assert result.applied
    raw = redis_client.hgetall(keys.job("job1"))
    gone = ("id", "error", "reason", "task_code", "ambiguous", "price_micros", "updated_at")
    assert not set(gone) & set(raw) and "reserved" not in raw
    # A late reservation for the finished job (a stale submit) reserves nothing again.
    assert store.reserve_budget("job1", "b1", 80000)
    assert store.batch_counts("b1")["reserved_micros"] == 80000
    job = store.get("job1")
    assert job is not None and job.state is JobState.COMPLETED and job.id == "job1"
    assert (job.error, job.reason, job.task_code, job.ambiguous) == ("", "", None, False)
    assert job.finished_at == 150.5 and job.outputs == ("https://o/1.jpeg",)
    [(_, event)] = store.events()
    assert event["job_id"] == "job1" and event["error"] == "" and event["task_code"] == ""
    assert event["finished_at"] == "150.5" and event["batch_id"] == "b1"
    # The index entries are found, and count as before.
    assert store.job_for_prediction(PID) == "job1"
    assert store.webhook_seen("w1") and not store.webhook_seen("w2")


def test_a_record_written_by_an_earlier_version_reads_and_moves_the_same(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """Every field written, `id` included, as create_jobs.lua wrote them before."""
    redis_client.hset(
        keys.job("old1"),
        mapping={
            "id": "old1",
            "state": "queued",
            "version": 1,
            "request": json.dumps(REQ.to_payload()),
            "idempotency_key": "",
            "priority": 0,
            "batch_id": "",
            "attempts": 0,
            "created_at": 100.0,
            "updated_at": 100.0,
        },
    )
    job = store.get("old1")
    assert job is not None and job.id == "old1" and job.state is JobState.QUEUED
    assert job.request == REQ.to_payload()
    assert store.transition("old1", JobState.SUBMITTING, now=101.0).applied
    assert store.transition("old1", JobState.CANCELLED, now=102.0, poll_at=REMOVE).applied
    [(_, event)] = store.events()
    assert event["job_id"] == "old1" and event["state"] == "cancelled"


def test_prediction_ids_and_webhook_marks_of_earlier_versions_still_count(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """A prediction id owned through a key of its own refuses another job's adoption; a
    webhook-id marked by a key of its own is a duplicate."""
    redis_client.set(keys.prediction(OTHER_PID), "owner", ex=3600)
    redis_client.set(keys.webhook_id("w-old"), "1", ex=3600)
    assert store.job_for_prediction(OTHER_PID) == "owner"
    assert store.webhook_seen("w-old")
    assert store.create("job1", REQ, now=100.0)
    assert store.transition("job1", JobState.SUBMITTING, now=101.0).applied
    adopt = store.transition(
        "job1",
        JobState.SUBMITTED,
        now=102.0,
        fields={"prediction_id": OTHER_PID},
        expect_prediction_id=OTHER_PID,
    )
    assert adopt.outcome is TransitionOutcome.MISMATCH
    again = store.transition("job1", JobState.FAILED, now=103.0, webhook_id="w-old", poll_at=REMOVE)
    assert again.outcome is TransitionOutcome.DUPLICATE


def test_index_entries_are_hash_fields_in_expiring_buckets(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """No key per prediction id or webhook mark: a field of a bucket that expires."""
    assert store.create("job1", REQ, now=100.0)
    assert store.transition("job1", JobState.SUBMITTING, now=101.0).applied
    assert store.transition(
        "job1",
        JobState.SUBMITTED,
        now=102.0,
        fields={"prediction_id": PID},
        expect_prediction_id=PID,
        webhook_id="w1",
    ).applied
    assert not redis_client.exists(keys.prediction(PID), keys.webhook_id("w1"))
    pred = [k for k in index_keys(keys.PREDICTION_PREFIX, PID, 3600) if redis_client.exists(k)]
    # A prediction id is named by its 16 bytes; other ids as they are.
    assert len(pred) == 1 and redis_client.hget(pred[0], bytes.fromhex(PID)) == "job1"
    # A job id of 32 hex digits is stored as a zero byte and its 16 bytes.
    hex_job = "cd" * 16
    assert store.create(hex_job, REQ, now=100.0)
    assert store.transition(hex_job, JobState.SUBMITTING, now=101.0).applied
    assert store.transition(
        hex_job,
        JobState.SUBMITTED,
        now=102.0,
        fields={"prediction_id": OTHER_PID},
        expect_prediction_id=OTHER_PID,
    ).applied
    assert store.job_for_prediction(OTHER_PID) == hex_job
    # ...and refuses another job's adoption of its task, read back by the script.
    assert store.transition("job2", JobState.SUBMITTING, now=101.0).outcome is (
        TransitionOutcome.MISSING
    )
    assert store.create("job2", REQ, now=100.0)
    assert store.transition("job2", JobState.SUBMITTING, now=101.0).applied
    steal = store.transition(
        "job2",
        JobState.SUBMITTED,
        now=102.0,
        fields={"prediction_id": OTHER_PID},
        expect_prediction_id=OTHER_PID,
    )
    assert steal.outcome is TransitionOutcome.MISMATCH
    # The owner itself may be told its own id again (a webhook after the worker's record).
    own = store.transition(hex_job, JobState.COMPLETED, now=103.0, expect_prediction_id=OTHER_PID)
    assert own.applied
    assert redis_client.ttl(pred[0]) > 0
    marks = [k for k in index_keys(keys.WEBHOOK_ID_PREFIX, "w1", 3600) if redis_client.exists(k)]
    assert len(marks) == 1 and redis_client.hget(marks[0], "w1") == "1"
    assert redis_client.ttl(marks[0]) > 0
    # A webhook-id of 32 hex digits is named by its bytes too, by the script and here alike.
    hex_id = "ab" * 16
    assert not store.webhook_seen(hex_id)
    done = store.transition("job1", JobState.CANCELLED, now=103.0, webhook_id=hex_id)
    assert done.applied and store.webhook_seen(hex_id)
    again = store.transition("job1", JobState.FAILED, now=104.0, webhook_id=hex_id)
    assert again.outcome is TransitionOutcome.DUPLICATE


def test_the_script_finds_an_index_entry_where_the_caller_would(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """A move names its ids' shards and entry names (worked out by the caller); one that
    names none (here: a cancel, whose prediction id comes from the record) has the script
    work them out, into the same bucket and entry the caller reads."""
    hex_job = "ef" * 16
    make_submitted_job(store, hex_job, PID)
    buckets = index_keys(keys.PREDICTION_PREFIX, PID, store.result_ttl_s)
    assert store.job_for_prediction(PID) == hex_job
    redis_client.delete(*buckets)  # so only the script's own rewrite below can hold it
    assert store.job_for_prediction(PID) is None
    assert store.transition(hex_job, JobState.CANCELLED, now=103.0).applied
    assert store.job_for_prediction(PID) == hex_job


def test_a_task_first_recorded_by_the_move_that_ends_its_job_is_paid_for(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """A submit whose answer was lost, then its webhook: the one move records the task
    (its price counted once, from the record) and finishes the job (the price dropped from
    the record, the event appended and its id kept)."""
    assert store.create("job1", REQ, batch_id="b1", idempotency_key="k1", now=100.0)
    assert store.transition(
        "job1", JobState.SUBMITTING, now=101.0, fields={"price_micros": 40000, "attempts": 1}
    ).applied
    paid_before = store.stats().get("paid_micros", 0)
    done = store.transition(
        "job1",
        JobState.COMPLETED,
        now=130.0,
        fields={"prediction_id": PID, "outputs": '["https://o/1.jpeg"]', "finished_at": 130.0},
        expect_prediction_id=PID,
        webhook_id="w1",
    )
    assert done.applied
    assert store.stats()["paid_micros"] - paid_before == 40000
    assert store.batch_counts("b1")["paid_micros"] == 40000
    raw = redis_client.hgetall(keys.job("job1"))
    assert "price_micros" not in raw and "updated_at" not in raw
    [(event_id, event)] = store.events()
    assert raw["event_id"] == event_id
    assert (event["prediction_id"], event["idempotency_key"], event["attempts"]) == (PID, "k1", "1")
    assert store.job_for_prediction(PID) == "job1"
