"""Ultra-tier scale: is the cost per job flat as the work in flight grows?

A private Redis holds `in_flight` jobs that each hold a provider slot (state `submitted`,
their next poll minutes away) and a batch of `waiting` jobs in the admission line behind
them, as an Ultra account (cap 10,000) with a 100,000-job batch would. Then rounds of
ROUND jobs go through the three steps that run per job whatever the load:

- a delivery: the result's atomic move (transition.lua: dedupe, move, event, slot freed);
- the dispatcher: `Admission.claim` hands the freed slots to waiting jobs;
- the poll sweep: `claim_due` takes the jobs whose poll is due (ROUND are made due).

Each step's cost per job is this process's CPU (the client side) plus the Redis time of
its commands (INFO commandstats, microseconds per command: exact, unlike /proc ticks).
The same rounds run at SMALL jobs in flight first, then at the large size; a step that
scanned all jobs in flight (or all waiting) would cost ~100x more per job at 10,000.
Goal: at most 1.2x. The full sizes (10,000 in flight, 100,000 waiting) take minutes to
set up here, so `make bench` runs 2,000 / 20,000 unless `--full-scale` is given.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import redis

from bench.common import Row, private_redis
from worker import keys
from worker.admission import Admission
from worker.domain import EditRequest, JobState
from worker.producer import Item, Producer
from worker.runtime import make_store
from worker.settings import Settings
from worker.store import REMOVE, JobStore

SCENARIO = "ultra-tier scale"
GOAL_RATIO = 1.2
SMALL = 100
ROUND = 100
FULL = (10_000, 100_000)  # in flight, waiting (the sizes)
DEFAULT = (2_000, 20_000)
QUICK = (400, 1_000)


def run(*, quick: bool, full: bool = False) -> list[Row]:
    in_flight, waiting = QUICK if quick else FULL if full else DEFAULT
    rounds = 3 if quick else 10
    small = _measure(SMALL, 2 * rounds * ROUND, rounds)
    large = _measure(in_flight, waiting, rounds)
    note = f"{ROUND} jobs x {rounds} rounds; us/job = client CPU + Redis command time"
    rows = []
    for step, label in (
        ("sweep", "poll sweep"),
        ("dispatch", "dispatcher claim"),
        ("deliver", "delivery's Redis move"),
    ):
        rows.append(
            Row.lower_is_better(
                SCENARIO,
                f"{label}: cost/job at {in_flight:,} in flight vs {SMALL}",
                large[step],
                small[step],
                "us",
                GOAL_RATIO,
                note=f"{waiting:,} waiting (large run), {2 * rounds * ROUND:,} (small); {note}",
            )
        )
    return rows


def _measure(in_flight: int, waiting: int, rounds: int) -> dict[str, float]:
    """Microseconds per job of each step, with `in_flight` slots held and `waiting` in line."""
    with private_redis() as url:
        env = {
            **os.environ,
            "KQ_REDIS_URL": url,
            "WAVESPEED_API_KEY": "bench-unused",
            "KQ_MAX_IN_FLIGHT": str(in_flight),
            "KQ_MAX_SUBMITS_PER_MINUTE": "10000000",
        }
        settings = Settings.from_env(env)
        store = make_store(settings)
        client = store.redis
        admission = Admission(client, settings)
        try:
            pids: dict[str, str] = {}
            flying = _in_flight(store, admission, in_flight, pids)
            _waiting(store, admission, waiting)
            costs = {"sweep": 0.0, "dispatch": 0.0, "deliver": 0.0}
            done = 0
            for _ in range(rounds):
                batch, flying = flying[:ROUND], flying[ROUND:]
                costs["deliver"] += _cost(
                    client, partial(_deliver, store, batch, pids, time.time())
                )
                claimed: list[str] = []
                costs["dispatch"] += _cost(client, partial(_claim, admission, claimed))
                flying.extend(_submitted(store, claimed, pids))  # back to `in_flight` slots held
                due = flying[:ROUND]
                client.zadd(keys.POLL, dict.fromkeys(due, time.time() - 1))
                costs["sweep"] += _cost(
                    client,
                    lambda: store.claim_due(
                        time.time(), limit=ROUND, min_interval=600, max_interval=3600
                    ),
                )
                done += ROUND
            return {step: total * 1e6 / done for step, total in costs.items()}
        finally:
            client.close()


def _cost(client: redis.Redis, step: Callable[[], object]) -> float:
    """Seconds of this process's CPU plus Redis's command time spent in `step`."""
    before = _redis_usec(client)
    cpu = time.process_time()
    step()
    cpu = time.process_time() - cpu
    # The INFO call itself is counted under cmdstat_info, which _redis_usec leaves out.
    return cpu + (_redis_usec(client) - before) / 1e6


def _redis_usec(client: redis.Redis) -> int:
    stats: Any = client.info("commandstats")
    return sum(int(v["usec"]) for k, v in stats.items() if k != "cmdstat_info")


def _jobs(store: JobStore, n: int, batch_id: str) -> list[str]:
    items = [
        Item(EditRequest(prompt=f"{batch_id} {i}", image="https://example.com/a.jpg"))
        for i in range(n)
    ]
    Producer(store=store, send=lambda ids: None).enqueue_batch(items, batch_id=batch_id)
    return [item.job_id for item in items]


def _in_flight(store: JobStore, admission: Admission, n: int, pids: dict[str, str]) -> list[str]:
    """`n` jobs that hold a slot and wait at the provider (poll far in the future)."""
    ids = _jobs(store, n, "ultra-in-flight")
    now = time.time()
    for job_id in ids:
        if not admission.acquire(job_id, "ultra-in-flight", 0, now).granted:
            raise RuntimeError("the cap is smaller than the jobs meant to be in flight")
    return _submitted(store, ids, pids)


def _submitted(store: JobStore, ids: list[str], pids: dict[str, str]) -> list[str]:
    """Move queued jobs on to `submitted` (their task ids go into `pids`)."""
    now = time.time()
    for job_id in ids:
        store.transition(job_id, JobState.SUBMITTING, now=now)
        prediction_id = pids[job_id] = secrets.token_hex(16)
        store.transition(
            job_id,
            JobState.SUBMITTED,
            now=now,
            fields={"prediction_id": prediction_id, "submitted_at": now},
            expect_prediction_id=prediction_id,
            poll_at=now + 3600,
        )
    return list(ids)


def _waiting(store: JobStore, admission: Admission, n: int) -> None:
    """`n` queued jobs in the admission line (one big batch) behind the ones in flight."""
    ids = _jobs(store, n, "ultra-waiting")
    now = time.time()
    for job_id in ids:
        admission.wait(job_id, "ultra-waiting", 0, now)


def _deliver(store: JobStore, ids: list[str], pids: dict[str, str], now: float) -> None:
    for job_id in ids:
        result = store.transition(
            job_id,
            JobState.COMPLETED,
            now=now,
            fields={"finished_at": now, "resolved_by": "webhook", "outputs": '["x"]'},
            expect_prediction_id=pids.pop(job_id),
            poll_at=REMOVE,
            webhook_id=secrets.token_hex(16),
        )
        if not result.applied:
            raise RuntimeError(f"the delivery for {job_id} was {result.outcome.value}")


def _claim(admission: Admission, claimed: list[str]) -> None:
    while len(claimed) < ROUND:
        got, _ = admission.claim(ROUND - len(claimed), time.time())
        if not got:
            raise RuntimeError(f"the dispatcher claimed {len(claimed)} of {ROUND} freed slots")
        claimed.extend(got)
