"""Prometheus metrics: the receiver's `/metrics` and the `kq metrics` exporter, counting.

Real parts: the receiver app served over HTTP on the session Redis, the exporter's
HTTP server, and `kq metrics` as a subprocess.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from tests.conftest import free_port, wait_for
from tests.support import serve_in_thread
from tests.test_receiver import body_for, deliver, make_job
from webhook_receiver.app import create_app
from worker import keys, telemetry
from worker.domain import EditRequest, JobState
from worker.histograms import (
    JOB_LATENCY_BUCKETS_S,
    WEBHOOK_RECEIVE_TO_APPLIED,
    bucket_slot,
    observe,
    read_latency,
)
from worker.metrics import StatusCollector, serve_exporter
from worker.settings import Settings
from worker.status import collect
from worker.store import JobStore

pytestmark = pytest.mark.integration

HEX_ID = re.compile(r"[0-9a-f]{32}")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from the Prometheus text format."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


@pytest.fixture
def receiver_url(settings: Settings, store: JobStore) -> Iterator[str]:
    app = create_app(replace(settings, webhook_max_bytes=4096), store=store)
    with serve_in_thread(app) as url:
        yield url


def test_receiver_metrics_count_webhook_outcomes(
    receiver_url: str, settings: Settings, store: JobStore
) -> None:
    """Each answer the receiver gives is counted under its outcome label."""
    make_job(store)
    assert deliver(receiver_url, settings, body_for()).json()["result"] == "applied"
    assert deliver(receiver_url, settings, body_for()).json()["result"] == "duplicate"
    assert deliver(receiver_url, settings, body_for(), webhook_id="x" * 32).json()["result"] == (
        "stale"
    )
    assert deliver(receiver_url, settings, body_for(), signature="v1,bad").status_code == 401
    assert deliver(receiver_url, settings, body_for(), token="0" * 64).status_code == 401
    assert deliver(receiver_url, settings, b"not json", webhook_id="m" * 32).status_code == 400
    assert deliver(receiver_url, settings, b"x" * 8000).status_code == 413

    text = httpx.get(f"{receiver_url}/metrics").text
    got = samples(text)
    expected = {
        "applied": 1,
        "duplicate": 1,
        "stale": 1,
        "bad_signature": 1,
        "bad_token": 1,
        "malformed": 1,
        "too_large": 1,
        "unavailable": 0,
    }
    for outcome, value in expected.items():
        assert got[("kq_webhook_requests_total", (("outcome", outcome),))] == value, outcome
    assert got[("kq_up", ())] == 1
    assert not HEX_ID.search(text)  # no job, prediction or webhook ids as labels
    assert httpx.get(f"{receiver_url}/healthz").status_code == 200  # not counted as a webhook
    again = samples(httpx.get(f"{receiver_url}/metrics").text)
    assert sum(v for (n, _), v in again.items() if n == "kq_webhook_requests_total") == 7


def test_exporter_serves_status_and_counters(store: JobStore, redis_client: redis.Redis) -> None:
    """`StatusCollector` over HTTP: jobs, resolution, counters, alarms, cost."""
    now = time.time()
    request = EditRequest(prompt="p", image="https://example.com/a.jpg")
    for state in (JobState.COMPLETED, JobState.FAILED):
        job_id = uuid.uuid4().hex
        store.create(job_id, request, now=now)
        store.transition(job_id, JobState.SUBMITTING, now=now)
        fields = {"finished_at": now + 2, "resolved_by": "poll", "prediction_id": f"p{job_id}"}
        store.transition(job_id, state, now=now + 2, fields=fields)
    store.create(uuid.uuid4().hex, request, now=now)
    telemetry.count_many(redis_client, {"submit.retry": 3, "submit.rate_limited": 2})
    # Two worker pods: both are PID 1 in their containers, told apart by their host names.
    pods = {keys.heartbeat("worker", pod, 1): now + 15 for pod in ("kq-worker-a", "kq-worker-b")}
    redis_client.zadd(keys.HEARTBEATS, pods)

    collector = StatusCollector(
        lambda: collect(redis_client, deadline_s=3600, webhooks_enabled=True),
        lambda: telemetry.totals(redis_client),
    )
    port = free_port()
    server, thread = serve_exporter(collector, port=port)
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    got = samples(text)
    assert got[("kq_up", ())] == 1
    assert got[("kq_jobs", (("state", "queued"),))] == 1
    assert got[("kq_jobs_enqueued_total", ())] == 3
    assert got[("kq_jobs_terminal_total", (("state", "completed"),))] == 1
    assert got[("kq_jobs_terminal_total", (("state", "failed"),))] == 1
    assert got[("kq_jobs_resolved_total", (("by", "poll"),))] == 2
    assert got[("kq_submit_total", (("outcome", "retry"),))] == 3
    assert got[("kq_submit_total", (("outcome", "rate_limited"),))] == 2
    assert got[("kq_paid_tasks_total", ())] == 2
    assert got[("kq_cost_usd_total", ())] == pytest.approx(0.16)
    assert got[("kq_dead_letters", ())] == 1
    assert got[("kq_process_heartbeats", (("role", "worker"),))] == 2
    assert got[("kq_alarm", (("name", "worker_down"),))] == 0
    assert got[("kq_alarm", (("name", "beat_down"),))] == 1
    assert got[("kq_latency_seconds", (("quantile", "0.5"),))] == pytest.approx(2, abs=0.01)
    assert got[("kq_celery_queue_length", (("queue", "kq"),))] == 0
    assert not HEX_ID.search(text)


def test_exporter_reports_redis_down() -> None:
    """With Redis unreachable a scrape still answers, with kq_up 0."""
    client = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    collector = StatusCollector(
        lambda: collect(client, deadline_s=3600, webhooks_enabled=False),
        lambda: telemetry.totals(client),
    )
    got = samples(
        "".join(f"{s.name} {s.value}\n" for family in collector.collect() for s in family.samples)
    )
    assert got == {("kq_up", ()): 0}


def test_kq_metrics_command(redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> None:
    """`kq metrics --port P` serves the exporter until stopped."""
    port = free_port()
    env = {**os.environ, "KQ_REDIS_URL": redis_url, "KQ_VAR_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kq.cli", "metrics", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def scrape() -> str | None:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/metrics").text
        except httpx.HTTPError:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            return None

    try:
        text: str = wait_for(scrape, timeout_s=20, interval_s=0.1)
        assert samples(text)[("kq_up", ())] == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()


def test_telemetry_never_raises_and_drops_unknown_names(redis_client: redis.Redis) -> None:
    """Counting with Redis down is a no-op; names outside the vocabulary are ignored."""
    down = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    telemetry.count(down, "submit.retry")  # must not raise
    telemetry.count(redis_client, "job.0123456789abcdef0123456789abcdef")
    telemetry.count(redis_client, "webhook.applied", 2)
    assert telemetry.totals(redis_client) == {"webhook.applied": 2}
    assert telemetry.recent(redis_client, 5)["webhook.applied"] == 2
    assert telemetry.today(redis_client)["webhook.applied"] == 2
    minute_keys = redis_client.keys(keys.TELEMETRY_PREFIX + "[0-9]*")
    assert len(minute_keys) == 1 and 0 < redis_client.ttl(minute_keys[0]) <= telemetry.BUCKET_TTL_S


# --- latency histograms ------------------------------------------------------------------


def finish_job(
    store: JobStore,
    state: JobState,
    *,
    created: float,
    submitted: float | None,
    finished: float,
) -> str:
    """A job enqueued at `created`, its task accepted at `submitted` (None: never), and
    ended in `state` at `finished`."""
    job_id = uuid.uuid4().hex
    store.create(job_id, EditRequest(prompt="p", image="https://example.com/a.jpg"), now=created)
    if submitted is not None:
        store.transition(job_id, JobState.SUBMITTING, now=submitted)
        store.transition(
            job_id,
            JobState.SUBMITTED,
            now=submitted,
            fields={"prediction_id": f"p{job_id}", "submitted_at": submitted},
            expect_prediction_id=f"p{job_id}",
        )
    result = store.transition(job_id, state, now=finished, fields={"finished_at": finished})
    assert result.applied
    return job_id


def buckets(got: dict[Any, float], name: str, **labels: str) -> dict[str, float]:
    """le -> cumulative count of one histogram series."""
    want = set(labels.items())
    return {
        dict(lbl)["le"]: v
        for (n, lbl), v in got.items()
        if n == f"{name}_bucket" and want <= set(lbl) and len(lbl) == len(want) + 1
    }


def test_latency_histograms_count_each_job_once_when_it_ends(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """enqueue->result and submit->result are real histograms, by terminal state, counted
    by the terminal move itself: once per job, whoever ends it, retries and all."""
    t = time.time() - 100_000
    done = finish_job(store, JobState.COMPLETED, created=t, submitted=t + 2, finished=t + 4)
    finish_job(store, JobState.COMPLETED, created=t, submitted=t + 100, finished=t + 700)
    finish_job(store, JobState.FAILED, created=t, submitted=None, finished=t + 0.5)
    finish_job(store, JobState.CANCELLED, created=t, submitted=t + 1, finished=t + 90_000)
    # A late duplicate result changes nothing, histograms included.
    again = store.transition(done, JobState.FAILED, now=t + 9, fields={"finished_at": t + 9})
    assert not again.applied

    collector = StatusCollector(
        lambda: collect(redis_client, deadline_s=3600, webhooks_enabled=False),
        lambda: telemetry.totals(redis_client),
        lambda: read_latency(redis_client),
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    got = samples(text)
    enq = "kq_enqueue_to_result_seconds"
    sub = "kq_submit_to_result_seconds"
    completed = buckets(got, enq, state="completed")
    assert list(completed) == [floatToGoString(b) for b in JOB_LATENCY_BUCKETS_S] + ["+Inf"]
    assert (completed["2.5"], completed["5.0"], completed["600.0"], completed["+Inf"]) == (
        0,
        1,
        1,
        2,
    )
    assert got[(f"{enq}_count", (("state", "completed"),))] == 2
    assert got[(f"{enq}_sum", (("state", "completed"),))] == pytest.approx(704)
    assert buckets(got, sub, state="completed")["5.0"] == 1
    assert buckets(got, sub, state="completed")["600.0"] == 2  # 2 s and 600 s
    assert got[(f"{sub}_sum", (("state", "completed"),))] == pytest.approx(602)
    # Failed before any task: counted from enqueue, not from a submit it never had.
    assert buckets(got, enq, state="failed")["1.0"] == 1
    assert got[(f"{sub}_count", (("state", "failed"),))] == 0
    # Over the last bound: only +Inf.
    cancelled = buckets(got, enq, state="cancelled")
    assert (cancelled["86400.0"], cancelled["+Inf"]) == (0, 1)
    assert not HEX_ID.search(text)


def test_lua_buckets_are_the_exporters() -> None:
    """transition.lua buckets with the bounds the exporter labels its `le` with."""
    lua = (Path(__file__).resolve().parent.parent / "worker" / "lua" / "transition.lua").read_text()
    match = re.search(r"local BOUNDS = \{([^}]*)\}", lua)
    assert match is not None
    assert tuple(float(x) for x in match.group(1).split(",")) == JOB_LATENCY_BUCKETS_S
    assert all(
        bucket_slot(JOB_LATENCY_BUCKETS_S, b) == i + 1 for i, b in enumerate(JOB_LATENCY_BUCKETS_S)
    )
    assert bucket_slot(JOB_LATENCY_BUCKETS_S, 86_400.5) == len(JOB_LATENCY_BUCKETS_S) + 1


def test_receiver_times_applied_webhooks(
    receiver_url: str, settings: Settings, store: JobStore, redis_client: redis.Redis
) -> None:
    """The receiver's /metrics has kq_webhook_receive_to_applied_seconds: applied
    deliveries only (a duplicate is not timed), summed over receiver processes in Redis."""
    make_job(store)
    assert deliver(receiver_url, settings, body_for()).json()["result"] == "applied"
    assert deliver(receiver_url, settings, body_for()).json()["result"] == "duplicate"
    observe(redis_client, WEBHOOK_RECEIVE_TO_APPLIED, 0.2)  # as another receiver process would
    got = samples(httpx.get(f"{receiver_url}/metrics").text)
    name = "kq_webhook_receive_to_applied_seconds"
    assert got[(f"{name}_count", ())] == 2
    assert 0.2 < got[(f"{name}_sum", ())] < 5
    assert got[(f"{name}_bucket", (("le", "0.25"),))] == 2
    assert got[(f"{name}_bucket", (("le", "0.1"),))] == 1
    assert not any(n.startswith("kq_enqueue_to_result") for n, _ in got)  # kq metrics' part
