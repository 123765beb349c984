"""Enqueue to event latency at a steady 50 jobs/s (Gold tier's rate), 1 s inference.

Jobs are enqueued one at a time, one every 20 ms, for DURATION_S; the simulator takes
1 s per task. For every job, what our pipeline adds to its result is the time from the
provider finishing the task (the simulator's `finished_at`, real Unix time) to its result
event on `kq:events` (the stream id: Redis's clock, the same host). p50 and p99 of that,
twice: with webhooks (the normal mode), and poll-only (no public URL: the poller finds
each result, so the added time is bounded by the poll interval).

Goals: with webhooks p99 <= 50 ms (the baseline column is that 50 ms); poll-only p99 <=
the poll interval (KQ_POLL_MIN_INTERVAL_S, here 2 s, its minimum).
"""

from __future__ import annotations

import time
from typing import Any

import redis

from bench.common import Row, Sim, bench_stack, stack_settings, wait_events
from kq.stack import Stack
from worker import keys
from worker.runtime import make_producer

SCENARIO = "enqueue->event latency"
RATE_PER_S = 50.0
INFERENCE_S = 1.0
WEBHOOK_GOAL_MS = 50.0
POLL_INTERVAL_S = 2.0  # KQ_POLL_MIN_INTERVAL_S (its minimum)
POLL_ENV = {
    "KQ_POLL_AFTER_S": str(INFERENCE_S),
    "KQ_POLL_MIN_INTERVAL_S": str(POLL_INTERVAL_S),
    "KQ_POLL_MAX_INTERVAL_S": str(POLL_INTERVAL_S),
    "KQ_SWEEP_INTERVAL_S": "0.25",
}
SIM_ARGS = (
    "--inference-time", str(INFERENCE_S), "--queue-delay", "0",
    "--webhook-workers", "32", "--seed", "11",
)  # fmt: skip
LIMITS = {"KQ_MAX_IN_FLIGHT": "3000", "KQ_MAX_SUBMITS_PER_MINUTE": "3000"}  # Gold


def run(*, quick: bool) -> list[Row]:
    duration_s = 2.0 if quick else 20.0
    hook = _added_ms(duration_s, webhooks=True)
    poll = _added_ms(duration_s, webhooks=False)
    n = int(duration_s * RATE_PER_S)
    return [
        Row.lower_is_better(
            SCENARIO,
            f"webhooks: p99 event - provider done ({n:,} jobs at 50/s) vs 50 ms",
            _pct(hook, 0.99),
            WEBHOOK_GOAL_MS,
            "ms",
            1.0,
            note=f"p50 {_pct(hook, 0.5):.1f} ms; 1 s inference",
        ),
        Row.lower_is_better(
            SCENARIO,
            "poll-only: p99 event - provider done vs the poll interval",
            _pct(poll, 0.99),
            POLL_INTERVAL_S * 1000,
            "ms",
            1.0,
            note=f"p50 {_pct(poll, 0.5):.0f} ms; first poll {INFERENCE_S:g} s after submit, "
            f"then every {POLL_INTERVAL_S:g} s, sweep every 0.25 s",
        ),
    ]


def _pct(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else 0.0


def _added_ms(duration_s: float, *, webhooks: bool) -> list[float]:
    """Per job, ms from the provider finishing to our event."""
    env = {**LIMITS, **({} if webhooks else POLL_ENV)}
    with bench_stack(
        sim_args=SIM_ARGS, extra_env=env, webhooks=webhooks, start_beat=not webhooks
    ) as stack:
        return _steady(stack, duration_s)


def _steady(stack: Stack, duration_s: float) -> list[float]:
    assert stack.sim_url is not None
    producer = make_producer(stack_settings(stack))
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    sim = Sim(stack.sim_url)
    n = int(duration_s * RATE_PER_S)
    try:
        # One job at a time on a fixed schedule (not a burst), as a steady producer sends.
        started = time.monotonic()
        for i in range(n):
            time.sleep(max(0.0, started + i / RATE_PER_S - time.monotonic()))
            producer.enqueue({"prompt": f"steady {i}", "image": "https://example.com/a.jpg"})
        if wait_events(client, n, 60 + duration_s) is None:
            raise RuntimeError(f"only {client.xlen(keys.EVENTS)} of {n} jobs finished")
        done = {t["id"]: float(t["finished_at"]) for t in sim.tasks() if t["finished_at"]}
        events: Any = client.xrange(keys.EVENTS)
        added = []
        for entry_id, fields in events:
            finished = done.get(fields.get("prediction_id", ""))
            if finished is not None:
                added.append((int(entry_id.split("-", 1)[0]) / 1000.0 - finished) * 1000)
        if len(added) < n:
            raise RuntimeError(f"{len(added)} of {n} events match a finished task")
        return added
    finally:
        sim.close()
        client.close()
        producer.close()
