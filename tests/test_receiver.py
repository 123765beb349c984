"""The webhook receiver over real HTTP (werkzeug in a thread) on a private Redis.

Each hostile delivery gets its stated answer and changes nothing stored.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import httpx
import pytest
import redis

from tests.conftest import wait_for
from tests.support import make_submitted_job as make_job
from tests.support import prediction_body as body_for
from tests.support import serve_in_thread
from webhook_receiver.app import create_app
from worker.chain_store import ChainStore
from worker.chains import chain_from_dict
from worker.domain import EditRequest, JobState
from worker.settings import Settings
from worker.signing import job_token, sign_v3
from worker.store import JobStore

PID = "0123456789abcdef0123456789abcdef"
OTHER_PID = "fedcba9876543210fedcba9876543210"
REQ = EditRequest(prompt="make it blue", image="https://example.com/a.jpg")


@pytest.fixture
def receiver(settings: Settings, store: JobStore) -> Iterator[str]:
    app = create_app(replace(settings, webhook_max_bytes=64 * 1024), store=store)
    with serve_in_thread(app) as url:
        yield url


def deliver(
    base: str,
    settings: Settings,
    body: bytes,
    *,
    job_id: str = "job1",
    token: str | None = None,
    webhook_id: str = "w" * 32,
    timestamp: int | None = None,
    signature: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    sig = signature or sign_v3(settings.webhook_secret, webhook_id, ts, body)
    sent = {"webhook-id": webhook_id, "webhook-timestamp": ts, "webhook-signature": sig}
    sent.update(headers or {})
    t = job_token(settings.secret_key, job_id) if token is None else token
    return httpx.post(
        f"{base}/webhooks/wavespeed",
        params={"job": job_id, "t": t},
        content=body,
        headers={k: v for k, v in sent.items() if v != ""},
    )


def snapshot(r: redis.Redis) -> dict[str, object]:
    return {k: r.dump(k) for k in sorted(r.keys("kq:job:*") + r.keys("kq:events"))}


def test_valid_delivery_applies_once(receiver: str, settings: Settings, store: JobStore) -> None:
    """A genuine delivery completes the job; the same webhook-id again is a duplicate."""
    make_job(store)
    first = deliver(receiver, settings, body_for())
    assert first.status_code == 200 and first.json()["result"] == "applied"
    again = deliver(receiver, settings, body_for())
    assert again.status_code == 200 and again.json()["result"] == "duplicate"
    other_id = deliver(receiver, settings, body_for(), webhook_id="x" * 32)
    assert other_id.status_code == 200 and other_id.json()["result"] == "stale"
    late_failed = deliver(receiver, settings, body_for(status="failed"), webhook_id="y" * 32)
    assert late_failed.json()["result"] == "stale"
    job = store.get("job1")
    assert job is not None and job.state is JobState.COMPLETED and job.resolved_by == "webhook"
    assert len(store.events()) == 1


def test_bad_signatures_and_tokens_are_401_and_change_nothing(
    receiver: str, settings: Settings, store: JobStore, redis_client: redis.Redis
) -> None:
    """Forged, tampered, stale, future, v1-style, missing headers, wrong token: all 401."""
    make_job(store)
    make_job(store, "job2", OTHER_PID)
    before = snapshot(redis_client)
    body = body_for()
    now = int(time.time())
    good_sig = sign_v3(settings.webhook_secret, "w" * 32, str(now), body)
    cases = {
        "forged": dict(signature="v3," + "0" * 64),
        "wrong secret": dict(signature=sign_v3("whsec_other", "w" * 32, str(now), body)),
        "v1 base64": dict(signature="v1,hGg2i3lG8bKxQ2m1J3m8vDqYc7nZ0R4b2yX9rW1uT5o="),
        # Well past the ±300 s window: `now` is truncated and the request takes time.
        "stale": dict(timestamp=now - 310),
        "future": dict(timestamp=now + 310),
        "missing signature": dict(headers={"webhook-signature": ""}),
        "missing id": dict(headers={"webhook-id": ""}),
        "missing timestamp": dict(headers={"webhook-timestamp": ""}),
        "wrong token": dict(token="0" * 32),
        "missing token": dict(token=""),
        "token of another job": dict(token=job_token(settings.secret_key, "job2")),
    }
    for name, kwargs in cases.items():
        response = deliver(receiver, settings, body, **kwargs)  # type: ignore[arg-type]
        assert response.status_code == 401, name
    tampered = deliver(receiver, settings, body.replace(b"1.jpeg", b"2.jpeg"), signature=good_sig)
    assert tampered.status_code == 401
    assert snapshot(redis_client) == before


def test_malformed_bodies_are_400(
    receiver: str, settings: Settings, store: JobStore, redis_client: redis.Redis
) -> None:
    """Validly signed but non-JSON or wrongly shaped bodies: 400, nothing changes."""
    make_job(store)
    before = snapshot(redis_client)
    for i, body in enumerate(
        [b"not json", b"[1,2]", b'{"id": "x"}', b'{"id":"' + PID.encode() + b'"}', b"\xff\xfe"]
    ):
        response = deliver(receiver, settings, body, webhook_id=f"{i:032d}")
        assert response.status_code == 400, body
        assert "error" in response.json()
    assert snapshot(redis_client) == before


def test_delivery_naming_another_jobs_prediction_changes_nothing(
    receiver: str, settings: Settings, store: JobStore
) -> None:
    """A signed delivery for job1's URL but job2's prediction id is answered stale."""
    make_job(store)
    make_job(store, "job2", OTHER_PID)
    response = deliver(receiver, settings, body_for(OTHER_PID))
    assert response.status_code == 200 and response.json()["result"] == "stale"
    job = store.get("job1")
    assert job is not None and job.state is JobState.SUBMITTED
    assert store.events() == []


def test_too_large_is_413(receiver: str, settings: Settings, store: JobStore) -> None:
    """A body over the limit is refused before it is read."""
    make_job(store)
    response = deliver(receiver, settings, b"{" + b" " * (70 * 1024) + b"}")
    assert response.status_code == 413


def test_unknown_job_is_acknowledged(receiver: str, settings: Settings) -> None:
    """A genuine delivery for a job we no longer have is 2xx (retrying cannot help)."""
    response = deliver(receiver, settings, body_for(), job_id="gone")
    assert response.status_code == 200 and response.json()["result"] == "unknown_job"


def test_healthz(receiver: str) -> None:
    """/healthz reports Redis reachable."""
    response = httpx.get(f"{receiver}/healthz")
    assert response.status_code == 200 and response.json()["redis"] == "ok"


def test_redis_down_is_503(settings: Settings) -> None:
    """With Redis unreachable, deliveries get 503 (WaveSpeed retries) and healthz says so."""
    from worker.runtime import make_store

    down = replace(settings, redis_url="redis://127.0.0.1:1/0")
    app = create_app(down, store=make_store(down))
    client = app.test_client()
    assert client.get("/healthz").status_code == 503
    body = body_for()
    ts = str(int(time.time()))
    response = client.post(
        f"/webhooks/wavespeed?job=job1&t={job_token(settings.secret_key, 'job1')}",
        data=body,
        headers={
            "webhook-id": "w" * 32,
            "webhook-timestamp": ts,
            "webhook-signature": sign_v3(settings.webhook_secret, "w" * 32, ts, body),
        },
    )
    assert response.status_code == 503


def test_other_methods_on_the_webhook_path_are_405(receiver: str) -> None:
    """Only POST delivers; anything else is refused in the JSON shape, changing nothing."""
    response = httpx.get(f"{receiver}/webhooks/wavespeed", params={"job": "job1"})
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json()["result"] == "method_not_allowed"
    assert httpx.get(f"{receiver}/nowhere").status_code == 404


def test_an_escaped_job_id_in_the_url_is_decoded(
    receiver: str, settings: Settings, store: JobStore
) -> None:
    """The URL's query is decoded as Flask would: an escaped job id names its job."""
    job_id = "job 1/é"
    make_job(store, job_id)
    response = deliver(receiver, settings, body_for(), job_id=job_id)
    assert response.status_code == 200 and response.json()["result"] == "applied"
    wrong = deliver(receiver, settings, body_for(), job_id=job_id, token="0" * 32)
    assert wrong.status_code == 401


def test_a_chain_step_written_by_a_delivery_is_sent_after_the_answer(
    settings: Settings, store: JobStore, redis_client: redis.Redis
) -> None:
    """The next step a completed delivery wrote goes to `send_submits`, once, after the
    answer; a duplicate of that delivery sends nothing again."""
    chains = ChainStore(redis_client)
    item = chain_from_dict({"image": REQ.image, "steps": [{"prompt": "a"}, {"prompt": "b"}]})
    (first,) = chains.create(item, batch_id="b1", now=time.time()).to_send
    now = time.time()
    store.transition(first, JobState.SUBMITTING, now=now)
    store.transition(
        first, JobState.SUBMITTED, now=now, fields={"prediction_id": PID}, expect_prediction_id=PID
    )
    sent: list[list[str]] = []
    app = create_app(settings, store=store, send_submits=sent.append)
    with serve_in_thread(app) as url:
        response = deliver(url, settings, body_for(), job_id=first)
        assert response.json()["result"] == "applied"
        wait_for(lambda: sent)
        again = deliver(url, settings, body_for(), job_id=first)
        assert again.json()["result"] == "duplicate"
    (second,) = sent[0]
    assert sent == [[second]]
    job = store.get(second)
    assert job is not None and job.state is JobState.QUEUED


def test_an_unexpected_error_is_a_json_500_and_changes_nothing(
    settings: Settings, store: JobStore, redis_client: redis.Redis
) -> None:
    """A bug on the delivery path (here: a clock that fails) answers 500 in the JSON shape,
    so the provider retries; in testing mode it reaches the test instead."""

    def broken_clock() -> float:
        raise RuntimeError("clock broke")

    make_job(store)
    before = snapshot(redis_client)
    app = create_app(settings, store=store, clock=broken_clock)
    with serve_in_thread(app) as url:
        response = deliver(url, settings, body_for())
    assert response.status_code == 500 and response.json()["result"] == "error"
    assert snapshot(redis_client) == before
    app.testing = True
    with pytest.raises(RuntimeError, match="clock broke"):
        app.test_client().post("/webhooks/wavespeed?job=job1&t=x", data=body_for())
