"""Admission control: the Redis side on its own, then several real worker processes
racing against a simulator, with a kill, a 429 storm, and a small batch behind a big one."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
import redis

from kq.stack import Stack, StackConfig
from tests.conftest import wait_for
from worker import keys
from worker.admission import Admission
from worker.domain import EditRequest, JobState
from worker.producer import Producer
from worker.runtime import make_producer, make_store
from worker.settings import Settings
from worker.store import JobStore

REQ = EditRequest(prompt="p", image="https://example.com/a.jpg")


@pytest.fixture
def admission(redis_client: redis.Redis, settings: Settings) -> Admission:
    return Admission(redis_client, replace(settings, max_in_flight=2, max_submits_per_minute=3))


def test_cap_waiting_line_and_release(admission: Admission, store: JobStore) -> None:
    """Two slots: the third job waits; releasing (a terminal move) lets a claim take it."""
    for job in ("a", "b", "c"):
        store.create(job, REQ, now=1.0)
    assert admission.acquire("a", "", 0, 100.0).granted
    assert admission.acquire("b", "", 0, 100.0).granted
    third = admission.acquire("c", "", 0, 100.0)
    assert not third.granted and third.retry_after_s > 0
    assert admission.acquire("a", "", 0, 100.0).held_already
    assert admission.claim(10, 100.0)[0] == []
    store.transition("a", JobState.FAILED, now=101.0)  # the Lua move gives the slot back
    assert admission.claim(10, 101.0)[0] == ["c"]
    snap = admission.snapshot(101.0)
    assert (snap.slots_used, snap.waiting, snap.submits_last_minute) == (2, 0, 3)


def test_line_up_does_what_a_refused_acquire_does_for_each_job(
    admission: Admission, redis_client: redis.Redis
) -> None:
    """While a slot is free and nobody waits, `line_up` does nothing (ask job by job);
    with the cap full it puts every job in line in turn, leaving out one that holds a
    slot; with others waiting it lines newcomers up even when a slot frees (they go
    first), exactly as `acquire` one by one would."""
    before = admission.snapshot(100.0)
    assert admission.line_up([("a", "", 0), ("b", "", 0)], 100.0) is None
    assert admission.snapshot(100.0) == before
    assert admission.acquire("a", "", 0, 100.0).granted
    assert admission.acquire("b", "", 0, 100.0).granted

    lined = admission.line_up([("c", "x", 0), ("a", "", 0), ("d", "x", 0), ("e", "y", 7)], 100.0)

    assert lined is not None and lined.held == {"a"} and lined.retry_after_s > 0
    assert redis_client.zscore(keys.admission_wait(""), "a") is None
    assert admission.snapshot(100.0).waiting == 3
    redis_client.zrem(keys.ADM_SLOTS, "a")  # as a's move out of flight does
    late = admission.line_up([("f", "x", 0), ("g", "x", 0)], 100.0)  # a slot is free now
    assert late is not None and late.held == frozenset()
    order = []
    for _ in range(5):
        order += admission.claim(1, 200.0 + 100 * len(order))[0]  # a rate window each
        redis_client.zrem(keys.ADM_SLOTS, *order)
    assert order == ["c", "e", "d", "f", "g"]  # batches in turn, arrival order within


def test_rate_window(admission: Admission, redis_client: redis.Redis) -> None:
    """Three submits a minute: the fourth waits until the first leaves the 61 s window."""
    for i, job in enumerate("abc"):
        assert admission.acquire(job, "", 0, 100.0 + i).granted
        redis_client.zrem(keys.ADM_SLOTS, job)  # as the job's move out of flight does
    blocked = admission.acquire("d", "", 0, 103.0)
    assert not blocked.granted and 57 < blocked.retry_after_s <= 58
    assert admission.claim(10, 150.0)[0] == []
    assert admission.claim(10, 161.5)[0] == ["d"]


def test_a_submit_counts_in_the_window_from_its_answer(
    redis_client: redis.Redis, settings: Settings, store: JobStore
) -> None:
    """A submit sent late after its slot was taken (a busy worker) counts from when its
    answer was recorded: the provider counted it on arrival, not at our take."""
    adm = Admission(redis_client, replace(settings, max_in_flight=10, max_submits_per_minute=1))
    for job in ("a", "b"):
        store.create(job, REQ, now=99.0)
    assert adm.acquire("a", "", 0, 100.0).granted
    store.transition("a", JobState.SUBMITTING, now=100.0, fields={"attempts": 1})
    # Its POST went out 1.5 s after the take; the answer came back at once.
    store.transition("a", JobState.SUBMITTED, now=101.5, fields={"prediction_id": "p-a"})
    # (Entries are named by attempt: a job's next attempt is an entry of its own.)
    assert redis_client.zrange(keys.ADM_SUBMITS, 0, -1, withscores=True) == [("a:1", 101.5)]
    assert not adm.acquire("b", "", 0, 161.2).granted  # 61 s after the take: too early
    assert adm.claim(10, 162.4)[0] == []
    assert adm.claim(10, 162.6)[0] == ["b"]
    assert redis_client.zrange(keys.ADM_SUBMITS, 0, -1) == ["b:1"]
    # A move long after its take (an ambiguous submit settled late) does not bring an
    # entry that has left the window back into it.
    store.transition("b", JobState.SUBMITTING, now=162.6, fields={"attempts": 1})
    store.transition("b", JobState.SUBMITTED, now=230.0, fields={"prediction_id": "p-b"})
    assert redis_client.zscore(keys.ADM_SUBMITS, "b:1") == 162.6


def test_round_robin_between_batches_and_priority_within(
    redis_client: redis.Redis, settings: Settings
) -> None:
    """Waiting jobs are served one batch after another; within a batch, higher priority first."""
    adm = Admission(redis_client, replace(settings, max_in_flight=1, max_submits_per_minute=10**6))
    assert adm.acquire("blocker", "", 0, 1.0).granted
    for i in range(5):
        adm.acquire(f"big{i}", "big", 0, 1.0)
    adm.acquire("small-low", "small", 0, 1.0)
    adm.acquire("small-high", "small", 5, 1.0)
    order = []
    for _ in range(7):
        redis_client.zrem("kq:adm:slots", *redis_client.zrange("kq:adm:slots", 0, -1))
        order += adm.claim(1, 2.0)[0]
    assert order[:4] == ["big0", "small-high", "big1", "small-low"]
    assert order[4:] == ["big2", "big3", "big4"]


def test_leases_recover_slots_of_vanished_jobs(admission: Admission) -> None:
    """A slot whose job never released it frees itself when its lease runs out."""
    assert admission.acquire("a", "", 0, 0.0).granted
    assert admission.acquire("b", "", 0, 0.0).granted
    assert not admission.acquire("c", "", 0, 100.0).granted
    later = admission.lease_s + 1
    assert admission.claim(10, later)[0] == ["c"]


def test_a_429_slows_everyone_then_recovers(redis_client: redis.Redis, settings: Settings) -> None:
    """After a 429: a short pause for all, half the rate, then back up by 10 % per 10 s."""
    adm = Admission(redis_client, replace(settings, max_in_flight=100, max_submits_per_minute=100))
    adm.penalize(1000.0)
    assert not adm.acquire("x", "", 0, 1001.0).granted
    snap = adm.snapshot(1001.0)
    assert snap.rate_factor == 0.5 and snap.rate_limited_total == 1
    assert adm.snapshot(1030.0).rate_factor == pytest.approx(0.8)
    assert adm.snapshot(1100.0).rate_factor == 1.0


# --- real workers ---------------------------------------------------------------------

CAP = 4


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config = StackConfig(
        var_dir=tmp_path_factory.mktemp("adm"),
        sim_args=("--inference-time", "0.4", "--seed", "2", "--webhook-retry-base", "0.2"),
        worker_concurrency=4,
        extra_env={
            "KQ_MAX_IN_FLIGHT": str(CAP),
            "KQ_MAX_SUBMITS_PER_MINUTE": "100000",
            "KQ_POLL_AFTER_S": "2",
            "KQ_SWEEP_INTERVAL_S": "0.5",
            "KQ_HTTP_TIMEOUT_S": "2",
            "KQ_AMBIGUOUS_GRACE_S": "3",
        },
    )
    with Stack(config, announce=lambda line: None) as running:
        for n in (2, 3):
            running._spawn(
                f"worker{n}",
                [*running.procs["worker"].argv],
                running._heartbeat_ready("worker"),
            )
        yield running


def settings_of(stack: Stack) -> Settings:
    return Settings.from_env({**os.environ, **stack.env})


@pytest.fixture
def producer(stack: Stack) -> Iterator[Producer]:
    """A producer on the stack, closed after the test (with the provider connection a
    cancel opens)."""
    with make_producer(settings_of(stack)) as made:
        yield made


def sim_tasks(stack: Stack) -> list[dict[str, Any]]:
    return list(httpx.get(f"{stack.sim_url}/_sim/tasks").json()["tasks"])


def max_overlap(tasks: list[dict[str, Any]]) -> int:
    """Most tasks alive at the provider at one moment (from its own timestamps)."""
    edges = []
    for t in tasks:
        end = t.get("finished_at") or time.time()
        edges += [(t["submitted_at"], 1), (end, -1)]
    live = peak = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
        live += step
        peak = max(peak, live)
    return peak


def test_slots_never_exceed_the_cap_across_three_workers(stack: Stack, producer: Producer) -> None:
    """Three worker processes, 40 jobs: the provider never holds more than the cap."""
    receipt = producer.enqueue_batch([REQ] * 40, batch_id="cap")
    progress = producer.wait_batch("cap", timeout_s=120)
    assert progress is not None and progress.done and progress.completed == 40
    cap_jobs = set(producer.store.batch_members("cap"))
    tasks = [t for t in sim_tasks(stack) if t["webhook"].split("job=")[1][:32] in cap_jobs]
    assert len(tasks) == 40
    assert max_overlap(tasks) <= CAP
    assert receipt.created == 40
    snap = Admission(producer.store.redis, settings_of(stack)).snapshot(time.time())
    assert snap.slots_used == 0 and snap.waiting == 0


def test_a_429_storm_slows_submits_and_loses_no_job(stack: Stack, producer: Producer) -> None:
    """Every submit refused for a while: jobs wait and all finish; the back-off is shared."""
    assert stack.sim_url is not None
    httpx.post(f"{stack.sim_url}/_sim/config", json={"burst_429_s": 2.0}).raise_for_status()
    producer.enqueue_batch([REQ] * 12, batch_id="storm")
    progress = producer.wait_batch("storm", timeout_s=120)
    assert progress is not None and progress.done and progress.completed == 12
    snap = Admission(producer.store.redis, settings_of(stack)).snapshot(time.time())
    assert snap.rate_limited_total > 0 and snap.slots_used == 0


def test_small_batch_behind_a_big_one_is_served_soon(stack: Stack, producer: Producer) -> None:
    """A 3-job batch enqueued behind a 400-job batch is served within a few big-batch jobs."""
    store = producer.store
    producer.enqueue_batch([REQ] * 400, batch_id="big")
    wait_for(lambda: _submitted(store, "big") >= 2 * CAP, timeout_s=60)
    before = _submitted(store, "big")
    producer.enqueue_batch([REQ] * 3, batch_id="small")
    wait_for(lambda: _submitted(store, "small") == 3, timeout_s=60)
    after = _submitted(store, "big")
    # Round robin: the big batch gets about one slot per small-batch slot meanwhile.
    assert after - before <= 3 * CAP, (before, after)
    assert producer.cancel_batch("big") > 0


def _submitted(store: JobStore, batch_id: str) -> int:
    jobs = store.get_many(store.batch_members(batch_id))
    return sum(1 for j in jobs if j is not None and j.prediction_id)


def test_a_killed_worker_gives_its_slots_back(stack: Stack, producer: Producer) -> None:
    """kill -9 a worker mid-batch: every job still ends, and no slot stays taken."""
    settings = settings_of(stack)
    producer.enqueue_batch([REQ] * 30, batch_id="kill")
    wait_for(lambda: _submitted(producer.store, "kill") >= CAP, timeout_s=60)
    stack.kill("worker", signal.SIGKILL)
    stack.restart("worker")
    progress = producer.wait_batch("kill", timeout_s=180)
    assert progress is not None and progress.done, progress
    store = make_store(settings)
    jobs = store.get_many(store.batch_members("kill"))
    assert all(j is not None and j.terminal for j in jobs)
    wait_for(lambda: Admission(store.redis, settings).snapshot(time.time()).slots_used == 0)


def test_claims_of_a_dead_dispatcher_go_back_in_line(
    redis_client: redis.Redis, settings: Settings, store: JobStore
) -> None:
    """A job claimed but never submitted (its process died) is lined up again after the lease."""
    adm = Admission(redis_client, replace(settings, max_in_flight=1, max_submits_per_minute=10**6))
    store.create("a", REQ, batch_id="b", now=1.0)
    store.create("blocker", REQ, now=1.0)
    assert adm.acquire("blocker", "", 0, 1.0).granted
    assert not adm.acquire("a", "b", 0, 1.0).granted
    store.transition("blocker", JobState.FAILED, now=2.0)
    assert adm.claim(5, 2.0)[0] == ["a"]  # ... and then the claimer dies
    assert adm.claim(5, 30.0)[0] == []
    assert adm.claim(5, 63.0)[0] == ["a"]  # lease over: back in line, claimed again
    store.transition("a", JobState.SUBMITTING, now=64.0)  # a submit ends the claim
    assert redis_client.zcard("kq:adm:claimed") == 0


def test_a_slot_taken_by_a_submit_that_died_comes_back(
    redis_client: redis.Redis, settings: Settings, store: JobStore
) -> None:
    """A worker killed between taking a slot and claiming the job: after the claim lease,
    slot and job go back in line (not after the hour-long slot lease)."""
    adm = Admission(redis_client, replace(settings, max_in_flight=1, max_submits_per_minute=10**6))
    store.create("a", REQ, now=1.0)
    assert adm.acquire("a", "", 0, 1.0).granted  # ... and the worker dies here
    assert adm.acquire("a", "", 0, 5.0).held_already  # a redelivery leaves it be
    assert adm.claim(5, 62.0)[0] == ["a"]  # lease over: back in line, claimed again
    assert adm.snapshot(62.0).slots_used == 1
