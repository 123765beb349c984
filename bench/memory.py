"""Memory: Redis bytes per finished job, and whether the worker's RSS keeps growing.

20,000 jobs go through the whole pipeline (simulator inference 0 s, results by
webhook) in two rounds, 1,000 then 19,000, measuring after each once the queue is
drained:

- Redis: `INFO memory` used_memory after all 20,000 minus before the first, divided by
  20,000. That is everything a finished job leaves behind while its record lives (7
  days by default): the job hash, its event on `kq:events`, the prediction-id index,
  the webhook-id mark, its batch-list entry. Read once more after SETTLE_S, when
  the admission control's one-minute log of recent submits has rolled over: that log
  is sized by the submit rate, not by the number of finished jobs, so the row counts
  what stays and the note gives the first reading too. The note also splits a sample
  of the per-job keys (MEMORY USAGE), to show where the bytes are. Limit: 1 KiB a job.
- the worker: VmRSS of the `kq worker` process after 20,000 jobs vs after 1,000.
  The first 1,000 warm everything up (connection pools, imports, caches); a leak
  would show as growth in the next 19,000. The limit is 10 % growth.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from bench.common import (
    UNLIMITED_ENV,
    Row,
    bench_stack,
    edits,
    rss_bytes,
    stack_settings,
    wait_events,
    wait_until,
)
from worker.celery_app import SUBMIT_QUEUE
from worker.runtime import make_producer

SCENARIO = "memory"
BYTES_PER_JOB_LIMIT = 1024
RSS_GROWTH_GOAL = 1.10
SIM_ARGS = ("--inference-time", "0", "--queue-delay", "0", "--webhook-workers", "32")
SAMPLE = 200  # keys measured one by one for the breakdown
# Longer than the admission control's sliding window of recent submits (61 s).
SETTLE_S = 65.0


def run(*, quick: bool) -> list[Row]:
    first, total = (50, 300) if quick else (1_000, 20_000)
    timeout_s = 60.0 if quick else 900.0
    with bench_stack(sim_args=SIM_ARGS, extra_env=UNLIMITED_ENV, start_beat=False) as stack:
        producer = make_producer(stack_settings(stack))
        client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
        worker_pid = stack.procs["worker"].pid
        try:
            before = _used_memory(client)
            producer.enqueue_batch(edits(first, "memory-1"), batch_id="bench-memory-1")
            _settle(client, first, timeout_s)
            rss_first = rss_bytes(worker_pid)
            producer.enqueue_batch(edits(total - first, "memory-2"), batch_id="bench-memory-2")
            _settle(client, total, timeout_s)
            rss_last = rss_bytes(worker_pid)
            at_once = _used_memory(client)
            if not quick:
                time.sleep(SETTLE_S)  # idle on purpose: see the module docstring
            after = _used_memory(client)
            breakdown = _breakdown(client, "bench-memory-2")
        finally:
            client.close()
            producer.close()
    per_job = (after - before) / total
    mib = 1024 * 1024
    return [
        Row.lower_is_better(
            SCENARIO,
            f"Redis bytes per finished job ({total:,} jobs)",
            per_job,
            BYTES_PER_JOB_LIMIT,
            "bytes",
            1.0,
            note=f"baseline is the 1 KiB budget; {(at_once - before) / total:,.0f} B/job "
            f"right after the last job; sampled per job: {breakdown}",
        ),
        Row.lower_is_better(
            SCENARIO,
            f"worker RSS after {total:,} jobs vs after {first:,}",
            rss_last / mib,
            rss_first / mib,
            "MiB",
            RSS_GROWTH_GOAL,
        ),
    ]


def _used_memory(client: redis.Redis) -> int:
    info: Any = client.info("memory")
    return int(info["used_memory"])


def _settle(client: redis.Redis, jobs: int, timeout_s: float) -> None:
    """Wait until `jobs` results are in and every Celery message is acked."""
    if wait_events(client, jobs, timeout_s) is None:
        raise RuntimeError(f"{jobs} jobs did not finish within {timeout_s:g} s")

    def drained() -> bool:
        return int(client.llen(SUBMIT_QUEUE)) == 0 and int(client.hlen("unacked")) == 0

    if not wait_until(drained, timeout_s):
        raise RuntimeError("the submit queue did not drain")


def _breakdown(client: redis.Redis, batch_id: str) -> str:
    """Average MEMORY USAGE per key kind, over a sample of one batch's jobs; the
    prediction index and the webhook-id marks (buckets of entries, see
    lua/transition.lua) per entry, over all their buckets."""
    ids: Any = client.lrange(f"kq:batchjobs:{batch_id}", 0, SAMPLE - 1)
    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        pipe.memory_usage(f"kq:job:{job_id}", samples=0)
    job_bytes = [int(a or 0) for a in pipe.execute()]
    events = int(client.xlen("kq:events"))
    stream = int(client.memory_usage("kq:events", samples=0) or 0)

    def mean(values: list[int]) -> str:
        return f"{sum(values) / len(values):,.0f}" if values else "?"

    return (
        f"job hash {mean(job_bytes)} B, event {stream / max(events, 1):,.0f} B, "
        f"pred index {_per_entry(client, 'kq:pred:*')} B, "
        f"webhook-id mark {_per_entry(client, 'kq:whid:*')} B"
    )


def _per_entry(client: redis.Redis, pattern: str) -> str:
    """MEMORY USAGE of the keys matching `pattern` per entry they hold (a hash bucket's
    fields, or 1 for a key of its own)."""
    names = list(client.scan_iter(match=pattern, count=1000))
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.memory_usage(name, samples=0)
        pipe.type(name)
    answers = pipe.execute()
    for name, kind in zip(names, answers[1::2], strict=True):
        if kind == "hash":
            pipe.hlen(name)
        else:
            pipe.exists(name)
    entries = sum(int(n) for n in pipe.execute())
    used = sum(int(a or 0) for a in answers[0::2])
    return f"{used / entries:,.0f}" if entries else "?"
