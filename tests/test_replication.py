"""Sentinel settings and the replica check before a paid submit (issue 14).

- KQ_REDIS_SENTINELS / KQ_REDIS_MASTER_NAME / KQ_REDIS_WAIT_* are read and checked, and
  the Celery broker becomes kombu's `sentinel://` list with the master name.
- `replication.confirm_claim` against a real Redis: with no replica, WAIT times out and
  the answer is no; a record at another version is a no too.
- `submit_job` with KQ_REDIS_WAIT_REPLICAS=1 and no replica: the provider is never
  called, the job is back in `queued` (its attempt recorded as having created no task),
  and the outcome is a retry, counted as `submit.unreplicated`.
- The receiver answers a delivery 200 only once its effect is on a replica (else 503,
  and WaveSpeed sends it again).
"""

from __future__ import annotations

import time
from dataclasses import replace

import httpx
import pytest

from tests.support import make_submitted_job, prediction_body, serve_in_thread
from tests.test_receiver import deliver
from webhook_receiver.app import create_app
from worker import replication, telemetry
from worker.celery_app import _redis_options, broker_transport_for, broker_url
from worker.domain import EditRequest, JobState
from worker.errors import ConfigError
from worker.service import Deps, SubmitOutcome, submit_job
from worker.settings import Settings
from worker.store import JobStore
from worker.wavespeed import WaveSpeedClient

REQ = EditRequest(prompt="make it blue", image="https://example.com/a.jpg")


def test_sentinel_settings_are_read_and_checked() -> None:
    """Sentinels turn the replica check on by default; bad lists name the variable."""
    env = {"KQ_REDIS_SENTINELS": "10.0.0.1:26379, [::1]:26380", "KQ_SECRET_KEY": "k"}
    settings = Settings.from_env(env)
    assert settings.redis_sentinels == (("10.0.0.1", 26379), ("::1", 26380))
    assert settings.redis_master_name == "kq"
    assert settings.redis_wait_replicas == 1
    assert settings.redis_url == "redis:///0"
    plain = Settings.from_env({"KQ_REDIS_URL": "redis://127.0.0.1:6379/0", "KQ_SECRET_KEY": "k"})
    assert plain.redis_sentinels == () and plain.redis_wait_replicas == 0
    off = Settings.from_env({**env, "KQ_REDIS_WAIT_REPLICAS": "0", "KQ_REDIS_MASTER_NAME": "m"})
    assert off.redis_wait_replicas == 0 and off.redis_master_name == "m"
    for bad in ("10.0.0.1", "host:0", "host:port", ":26379"):
        with pytest.raises(ConfigError, match="KQ_REDIS_SENTINELS"):
            Settings.from_env({"KQ_REDIS_SENTINELS": bad, "KQ_SECRET_KEY": "k"})


def test_the_broker_follows_the_sentinels_too() -> None:
    """No KQ_BROKER_URL: Celery gets one sentinel:// URL per Sentinel (password and
    database from KQ_REDIS_URL), our guarded Sentinel transport, and the master name."""
    settings = Settings.from_env(
        {
            "KQ_REDIS_SENTINELS": "s1:26379,s2:26380",
            "KQ_REDIS_URL": "redis://:pw@ignored:6379/3",
            "KQ_REDIS_MASTER_NAME": "jobs",
            "KQ_SECRET_KEY": "k",
        }
    )
    url = broker_url(settings)
    assert url == "sentinel://:pw@s1:26379/3;sentinel://:pw@s2:26380/3"
    assert broker_transport_for(url) == "worker.celery_app:SentinelTransport"
    options = _redis_options(settings, url)["broker_transport_options"]
    assert options["master_name"] == "jobs"
    amqp = replace(settings, broker_url="amqp://guest@rabbit//")
    assert broker_url(amqp) == "amqp://guest@rabbit//"


def test_confirm_claim_is_no_without_a_replica(store: JobStore) -> None:
    """WAIT on a Redis without replicas times out (0 acknowledged): not confirmed; with
    0 replicas asked it is confirmed; a record at another version is never confirmed."""
    store.create("j1", REQ, now=time.time())
    version = store.get("j1").version  # type: ignore[union-attr]
    began = time.monotonic()
    answer = replication.confirm_claim(
        store.redis, "j1", version=version, replicas=1, timeout_ms=200
    )
    assert not answer.confirmed and answer.replicas == 0
    assert time.monotonic() - began >= 0.15
    assert replication.confirm_claim(
        store.redis, "j1", version=version, replicas=0, timeout_ms=200
    ).confirmed
    stale = replication.confirm_claim(
        store.redis, "j1", version=version + 1, replicas=0, timeout_ms=200
    )
    assert not stale.confirmed and "version" in stale.detail


def test_submit_waits_for_a_replica_and_never_posts_without_one(
    store: JobStore, settings: Settings
) -> None:
    """KQ_REDIS_WAIT_REPLICAS=1 with no replica: no POST reaches the provider; the job is
    queued again, unsent, to be retried; the hold-back is counted."""
    posts: list[httpx.Request] = []

    def provider(request: httpx.Request) -> httpx.Response:
        posts.append(request)
        return httpx.Response(500)

    client = WaveSpeedClient(
        "http://provider.invalid", "key", transport=httpx.MockTransport(provider)
    )
    deps = Deps(
        store=store,
        provider=client,
        settings=replace(settings, redis_wait_replicas=1, redis_wait_timeout_ms=100),
    )
    store.create("j2", REQ, now=time.time())
    result = submit_job(deps, "j2")
    assert result.outcome is SubmitOutcome.RETRY and "not replicated" in result.detail
    assert posts == []
    job = store.get("j2")
    assert job is not None and job.state is JobState.QUEUED and not job.prediction_id
    assert telemetry.totals(store.redis)["submit.unreplicated"] == 1
    client.close()


def test_receiver_acknowledges_a_webhook_only_once_it_is_on_a_replica(
    store: JobStore, settings: Settings
) -> None:
    """KQ_REDIS_WAIT_REPLICAS=1 and no replica: the delivery is applied on the primary
    but answered 503 (so WaveSpeed sends it again), also when it comes again; with the
    check off the same Redis answers 200."""
    make_submitted_job(store)
    waiting = replace(settings, redis_wait_replicas=1, redis_wait_timeout_ms=100)
    with serve_in_thread(create_app(waiting, store=store)) as url:
        first = deliver(url, settings, prediction_body())
        assert first.status_code == 503 and "replica" in first.json()["error"]
        assert store.get("job1").state is JobState.COMPLETED  # type: ignore[union-attr]
        assert deliver(url, settings, prediction_body()).status_code == 503
    with serve_in_thread(create_app(settings, store=store)) as url:
        again = deliver(url, settings, prediction_body())
        assert again.status_code == 200 and again.json()["result"] == "duplicate"
    assert len(store.events()) == 1
