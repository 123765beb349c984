"""The receiver when Redis stalls: a prompt 503 (so WaveSpeed retries), and the retry applied.

A Redis of its own per test, frozen with SIGSTOP as a hung primary or a network partition
would leave it; the receiver runs on a fail-fast client made as `kq receiver` makes its
own (`receiver`), whose connections the test closes.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from flask import Flask

from tests.conftest import private_redis_server
from tests.support import make_submitted_job, prediction_body, serve_in_thread
from tests.test_receiver import deliver
from webhook_receiver.app import create_app
from worker import runtime
from worker.domain import JobState
from worker.settings import Settings
from worker.signing import job_token, sign_v3
from worker.store import JobStore

# WaveSpeed waits this long for an answer before it counts a delivery as failed.
PROVIDER_WEBHOOK_TIMEOUT_S = 5.0


@pytest.fixture
def frozen_redis(tmp_path: Path, settings: Settings) -> Iterator[tuple[Settings, JobStore, int]]:
    with private_redis_server(tmp_path) as (url, proc):
        client = redis.Redis.from_url(url, decode_responses=True)
        store = JobStore(client, result_ttl_s=3600, events_maxlen=10_000)
        yield replace(settings, redis_url=url), store, proc.pid
        client.close()


@contextmanager
def receiver(settings: Settings) -> Iterator[Flask]:
    """The receiver on a fail-fast client made as `create_app` makes its own for `kq
    receiver`; every connection of it (each server thread's own included) is closed after."""
    store = runtime.make_store(settings, runtime.make_redis(settings, fail_fast=True))
    try:
        yield create_app(settings, store=store, heartbeat=False)
    finally:
        runtime.close_redis(store.redis)


def test_a_stalled_redis_gets_a_prompt_503_and_the_retry_is_applied(
    frozen_redis: tuple[Settings, JobStore, int],
) -> None:
    """While Redis is frozen the receiver answers 503 well within the provider's timeout;
    once it is back, the provider's retry of that same delivery completes the job (it is
    never answered "duplicate" without its result applied)."""
    settings, store, redis_pid = frozen_redis
    make_submitted_job(store)
    with receiver(settings) as app, serve_in_thread(app) as url:
        assert deliver(url, settings, b"{}", webhook_id="warm").status_code == 400  # connected
        os.kill(redis_pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            frozen = deliver(url, settings, prediction_body(), webhook_id="w1")
            elapsed = time.monotonic() - started
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        assert frozen.status_code == 503 and frozen.json()["result"] == "unavailable"
        assert elapsed < PROVIDER_WEBHOOK_TIMEOUT_S - 1
        retry = deliver(url, settings, prediction_body(), webhook_id="w1")
        assert retry.status_code == 200
        job = store.get("job1")
        assert job is not None and job.state is JobState.COMPLETED
        # "duplicate" only if the frozen attempt's script ran when Redis woke: then it
        # was applied, which the job's state above proves.
        assert retry.json()["result"] in ("applied", "duplicate")
        assert len(store.events()) == 1


def test_a_connection_redis_dropped_is_replaced_without_a_503(
    frozen_redis: tuple[Settings, JobStore, int],
) -> None:
    """A server thread keeps its own Redis connection between deliveries; when Redis drops
    it (a restart, an idle timeout), the next delivery on that thread reconnects and is
    applied, rather than answered 503 and left for the provider's retry minutes later."""
    settings, store, _ = frozen_redis
    pids = {"job1": "1" * 32, "job2": "2" * 32}
    for job_id, pid in pids.items():
        make_submitted_job(store, job_id, pid)
    # Called from this one thread (no server): both deliveries use the same thread's
    # connection, of a fail-fast client made as `kq receiver` makes its own.
    with receiver(settings) as app:
        client = app.test_client()

        def post(job_id: str) -> tuple[int, str]:
            body = prediction_body(pids[job_id])
            webhook_id, ts = f"w-{job_id}", str(int(time.time()))
            response = client.post(
                f"/webhooks/wavespeed?job={job_id}&t={job_token(settings.secret_key, job_id)}",
                data=body,
                headers={
                    "webhook-id": webhook_id,
                    "webhook-timestamp": ts,
                    "webhook-signature": sign_v3(settings.webhook_secret, webhook_id, ts, body),
                },
            )
            return response.status_code, response.get_json()["result"]

        assert post("job1") == (200, "applied")
        killed = store.redis.client_kill_filter(_type="normal", skipme=True)
        assert killed >= 1  # the receiver's connection among them
        assert post("job2") == (200, "applied")
        assert [store.get(j).state for j in pids] == [JobState.COMPLETED] * 2  # type: ignore[union-attr]
