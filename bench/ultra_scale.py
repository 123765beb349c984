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
The same rounds run at SMALL jobs in flight and at the large size, alternating; a step that
scanned all jobs in flight (or all waiting) would cost ~100x more per job at 10,000.
Goal: at most 1.2x. The full sizes (10,000 in flight, 100,000 waiting) take minutes to
set up here, so `make bench` runs 2,000 / 20,000 unless `--full-scale` is given.
"""

from __future__ import annotations

import os
import secrets
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
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
    rounds = 3 if quick else 20
    with Scale(SMALL, 2 * rounds * ROUND) as small, Scale(in_flight, waiting) as large:
        # Rounds alternate between the two sizes (and which goes first), so a burst of
        # load from elsewhere on the machine lands on both sides, not on one.
        small_costs: list[dict[str, float]] = []
        large_costs: list[dict[str, float]] = []
        for i in range(rounds):
            pair = [(small, small_costs), (large, large_costs)]
            for scale, costs in pair if i % 2 == 0 else reversed(pair):
                costs.append(scale.round())
    note = (
        f"{ROUND} jobs x {rounds} rounds, the two sizes alternating; us/job = client CPU + "
        "Redis command time, median of the rounds"
    )
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
                _median_us(large_costs, step),
                _median_us(small_costs, step),
                "us",
                GOAL_RATIO,
                note=f"{waiting:,} waiting (large run), {2 * rounds * ROUND:,} (small); {note}",
            )
        )
    return rows


def _median_us(costs: list[dict[str, float]], step: str) -> float:
    return statistics.median(c[step] for c in costs) * 1e6 / ROUND


class Scale:
    """A private Redis with `in_flight` jobs holding slots and `waiting` in line behind."""

    def __init__(self, in_flight: int, waiting: int) -> None:
        self._sizes = (in_flight, waiting)
        self._exit = ExitStack()

    def __enter__(self) -> Scale:
        in_flight, waiting = self._sizes
        url = self._exit.enter_context(private_redis())
        env = {
            **os.environ,
            "KQ_REDIS_URL": url,
            "WAVESPEED_API_KEY": "bench-unused",
            "KQ_MAX_IN_FLIGHT": str(in_flight),
            "KQ_MAX_SUBMITS_PER_MINUTE": "10000000",
        }
        settings = Settings.from_env(env)
        self.store = make_store(settings)
        self.client = self.store.redis
        self._exit.callback(self.client.close)
        self.admission = Admission(self.client, settings)
        self.pids: dict[str, str] = {}
        self.flying = _in_flight(self.store, self.admission, in_flight, self.pids)
        _waiting(self.store, self.admission, waiting)
        return self

    def __exit__(self, *exc: object) -> None:
        self._exit.close()

    def round(self) -> dict[str, float]:
        """Seconds of each step for ROUND jobs: deliver, dispatch, sweep."""
        store, client = self.store, self.client
        batch, self.flying = self.flying[:ROUND], self.flying[ROUND:]
        costs = {"deliver": _cost(client, partial(_deliver, store, batch, self.pids, time.time()))}
        claimed: list[str] = []
        costs["dispatch"] = _cost(client, partial(_claim, self.admission, claimed))
        self.flying.extend(_submitted(store, claimed, self.pids))  # back to in_flight held
        client.zadd(keys.POLL, dict.fromkeys(self.flying[:ROUND], time.time() - 1))
        costs["sweep"] = _cost(
            client,
            lambda: store.claim_due(time.time(), limit=ROUND, min_interval=600, max_interval=3600),
        )
        return costs


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
