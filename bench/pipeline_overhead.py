"""Pipeline overhead: jobs/s through the whole pipeline vs no-op Celery tasks/s.

Ours: 5,000 jobs go enqueue -> `kq worker` submits -> the simulator (inference 0 s)
calls the receiver back -> the result is applied -> one event lands on `kq:events`.
Timed from the start of `enqueue_batch` to the id (Redis's clock) of the last event.

Baseline: the same number of no-op Celery tasks, defined here, run by a real `celery
worker` process with the same pool (threads), concurrency, acks/prefetch/event settings
and log level as `kq worker`, on the same Redis; timed from the start of the enqueue
to the moment every message is acked (queue empty, nothing in kombu's `unacked` hash).

So the ratio asks: does a whole job cost us less than one bare Celery task? Beat is not
started (no poll is due: every webhook arrives), so only the job's own path is timed.

On a small machine both sides are CPU-bound, and ours shares the cores with the
simulator (in production WaveSpeed's servers do that work elsewhere): the wall-clock
row pays for it. So a second row compares CPU time per job (each of our processes,
from /proc, plus this one's enqueue; the simulator left out) with CPU time per no-op
task (the Celery worker, Redis, and this process's publishing). It also moves much
less with other work on a shared machine than the wall-clock ratio. The note splits
ours by process, the simulator included.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery

from bench.common import (
    REPO_ROOT,
    UNLIMITED_ENV,
    Row,
    bench_stack,
    cpu_per_job_ms,
    cpu_snapshot,
    edits,
    process_tree,
    stack_settings,
    wait_events,
    wait_until,
)
from kq.procs import Proc
from kq.stack import Stack
from worker import keys
from worker.celery_app import app as kq_app
from worker.runtime import make_producer

SCENARIO = "pipeline overhead"
GOAL_RATIO = 1.0
CPU_GOAL = 1.5
# The stack's default, stated here because the baseline must use the same value.
WORKER_CONCURRENCY = 8
NOOP_QUEUE = "bench.noop"
# kombu's Redis transport keeps delivered-but-unacked messages in this hash.
UNACKED_KEY = "unacked"
# Webhook sender threads in the simulator: its default (8) would make the simulator, not
# us, the bottleneck of a zero-inference run.
SIM_ARGS = (
    "--inference-time", "0", "--queue-delay", "0", "--webhook-workers", "32", "--seed", "5",
)  # fmt: skip

# The baseline's app: our Celery settings that shape per-task cost, and nothing else.
noop_app = Celery("kq-bench-noop", set_as_current=False)
noop_app.conf.update(
    {
        key: kq_app.conf[key]
        for key in (
            "task_serializer",
            "accept_content",
            "task_ignore_result",
            "task_acks_late",
            "task_reject_on_worker_lost",
            "worker_prefetch_multiplier",
            "broker_transport_options",
            "worker_send_task_events",
            "task_send_sent_event",
            "worker_hijack_root_logger",
            "broker_connection_retry_on_startup",
        )
    },
    task_default_queue=NOOP_QUEUE,
)


@noop_app.task(name="bench.noop")
def noop() -> None:
    """Does nothing: what is left is Celery's own cost per task."""


@dataclass(frozen=True)
class Measured:
    """One side's throughput and its CPU milliseconds per job, by process group."""

    rate: float
    cpu_ms: dict[str, float]
    by_webhook: int = 0

    def cpu_total(self, leave_out: str = "") -> float:
        return sum(ms for name, ms in self.cpu_ms.items() if name != leave_out)


def run(*, quick: bool) -> list[Row]:
    n = 200 if quick else 5_000
    warm = 5 if quick else 50
    timeout_s = 60.0 if quick else 600.0
    with bench_stack(
        sim_args=SIM_ARGS,
        extra_env=UNLIMITED_ENV,
        worker_concurrency=WORKER_CONCURRENCY,
        start_beat=False,
    ) as stack:
        client = redis.Redis.from_url(stack.redis_url)
        try:
            base = _noop(stack, client, n, timeout_s)
            ours = _pipeline(stack, client, n, warm, timeout_s)
        finally:
            client.close()
    split = ", ".join(f"{name} {ms:.2f}" for name, ms in ours.cpu_ms.items())
    base_split = ", ".join(f"{name} {ms:.2f}" for name, ms in base.cpu_ms.items())
    return [
        Row.higher_is_better(
            SCENARIO,
            f"{n:,} jobs enqueue->event vs no-op Celery tasks",
            ours.rate,
            base.rate,
            "jobs/s",
            GOAL_RATIO,
            note=f"{ours.by_webhook:,} of {n + warm:,} jobs resolved by webhook; "
            f"threads pool, concurrency {WORKER_CONCURRENCY} on both sides",
        ),
        Row.lower_is_better(
            SCENARIO,
            "CPU per job (simulator left out) vs per no-op task",
            ours.cpu_total(leave_out="sim"),
            base.cpu_total(),
            "ms",
            CPU_GOAL,
            note=f"ours, ms per job: {split}; no-op, ms per task: {base_split}",
        ),
    ]


def _pipeline(stack: Stack, client: redis.Redis, n: int, warm: int, timeout_s: float) -> Measured:
    """Our jobs/s and CPU per job, after a warm-up batch."""
    settings = stack_settings(stack)
    with make_producer(settings) as producer:
        producer.enqueue_batch(edits(warm, "warm-up"), batch_id="bench-warm-up")
        if wait_events(client, warm, timeout_s) is None:
            raise RuntimeError(f"warm-up: {warm} jobs did not finish within {timeout_s:g} s")
        groups = {name: process_tree(p.pid) for name, p in stack.procs.items() if p.alive}
        cpu_before = cpu_snapshot(groups)
        started = time.time()
        producer.enqueue_batch(edits(n, "pipeline"), batch_id="bench-pipeline")
    finished = wait_events(client, warm + n, timeout_s)
    if finished is None:
        done = int(client.xlen(keys.EVENTS)) - warm
        raise RuntimeError(f"only {done} of {n} jobs finished within {timeout_s:g} s")
    cpu_ms = cpu_per_job_ms(cpu_before, cpu_snapshot(groups), n)
    by_webhook: Any = client.hget(keys.STATS, "resolved_by:webhook")
    return Measured(n / (finished - started), cpu_ms, int(by_webhook or 0))


def _noop(stack: Stack, client: redis.Redis, n: int, timeout_s: float) -> Measured:
    """No-op tasks/s (and CPU per task) through a real `celery worker` with our pool settings."""
    noop_app.conf.broker_url = stack.redis_url
    argv = [
        sys.executable, "-m", "celery",
        "--app", f"{__name__}:noop_app",
        "--broker", stack.redis_url,
        "--workdir", str(REPO_ROOT),
        "worker",
        "--pool=threads",
        f"--concurrency={WORKER_CONCURRENCY}",
        "--loglevel=INFO",  # as `kq worker`: Celery logs each task at INFO
        f"--queues={NOOP_QUEUE}",
        "--hostname=bench-noop@%h",
        "--without-gossip",
        "--without-mingle",
    ]  # fmt: skip
    probe_sent: list[bool] = []

    def ready(_proc: Proc) -> bool:
        # Ready once it has consumed and acked one probe task: proof of the whole path.
        if not probe_sent:
            noop.apply_async(queue=NOOP_QUEUE)
            probe_sent.append(True)
        return _drained(client)

    proc = stack._spawn("noop-worker", argv, ready)
    groups = {"celery": process_tree(proc.pid), "redis": [stack.procs["redis"].pid]}
    try:
        cpu_before = cpu_snapshot(groups)
        started = time.time()
        with noop_app.producer_or_acquire() as producer:
            for _ in range(n):
                noop.apply_async(queue=NOOP_QUEUE, producer=producer)
        if not wait_until(lambda: _drained(client), timeout_s, interval_s=0.01):
            raise RuntimeError(f"no-op baseline: {n} tasks not acked within {timeout_s:g} s")
        finished = time.time()
        cpu_ms = cpu_per_job_ms(cpu_before, cpu_snapshot(groups), n)
    finally:
        proc.stop()
        noop_app.close()  # its pooled broker connections point at this stack's Redis
    return Measured(n / (finished - started), cpu_ms)


def _drained(client: redis.Redis) -> bool:
    return int(client.llen(NOOP_QUEUE)) == 0 and int(client.hlen(UNACKED_KEY)) == 0
