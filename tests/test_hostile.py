"""Hostile deliveries to the webhook receiver over real HTTP, beyond test_receiver.py.

Wrong signature version tags, replayed webhook-ids (also raced), 2 MB bodies (sized
and chunked), JSON of the wrong shape (down to nesting deep enough to break a
recursive parser), and, against the real gunicorn receiver that `kq receiver` starts,
a 413 followed by a delivery on the same kept-alive connection, slow-loris clients, and
many clients at once (applied on a few Redis connections). Each gets its stated answer
and changes nothing stored.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import redis

from kq.stack import Stack, StackConfig
from tests.conftest import wait_for
from tests.support import make_submitted_job as make_job
from tests.support import prediction_body as body_for
from tests.support import serve_in_thread
from webhook_receiver.app import REDIS_CONNECTIONS, create_app
from worker.domain import EditRequest, JobState
from worker.settings import DEFAULT_WEBHOOK_MAX_BYTES, Settings
from worker.signing import job_token, sign_v3
from worker.store import JobStore

PID = "0123456789abcdef0123456789abcdef"
OTHER_PID = "fedcba9876543210fedcba9876543210"
REQ = EditRequest(prompt="make it blue", image="https://example.com/a.jpg")
# Keys that change on every request by design (ops counters, liveness), not job state.
VOLATILE = ("kq:tm:", "kq:heartbeat")
BODY_TIMEOUT_S = 2.0
# With the trickler, more than 2 workers x 8 threads (`kq receiver --worker-class gthread`);
# under gevent (the default) each holds a greenlet.
SLOW_CLIENTS = 20


def stored(r: redis.Redis) -> dict[str, object]:
    """Everything the receiver could have changed: every kq: key but the volatile ones."""
    keys = [k for k in r.keys("kq:*") if not str(k).startswith(VOLATILE)]
    return {str(k): r.dump(k) for k in sorted(keys)}


def signed_headers(
    settings: Settings, body: bytes, webhook_id: str = "w" * 32, ts: int | None = None
) -> dict[str, str]:
    stamp = str(int(time.time()) if ts is None else ts)
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": stamp,
        "webhook-signature": sign_v3(settings.webhook_secret, webhook_id, stamp, body),
    }


def hook_url(base: str, settings: Settings, job_id: str = "job1") -> str:
    return f"{base}/webhooks/wavespeed?job={job_id}&t={job_token(settings.secret_key, job_id)}"


@pytest.fixture
def receiver(settings: Settings, store: JobStore) -> Iterator[str]:
    """The receiver with its production body limit, under werkzeug in a thread."""
    app = create_app(replace(settings, webhook_max_bytes=DEFAULT_WEBHOOK_MAX_BYTES), store=store)
    # A short poll interval: shutdown() waits for it, once per test.
    with serve_in_thread(app, poll_interval_s=0.05) as url:
        yield url


def test_wrong_signature_version_tags_are_401(
    receiver: str, settings: Settings, store: JobStore, redis_client: redis.Redis
) -> None:
    """The right HMAC under any tag but exactly `v3,<lowercase hex>` is refused, storing nothing."""
    make_job(store)
    body = body_for()
    good = signed_headers(settings, body)
    digest = good["webhook-signature"].removeprefix("v3,")
    before = stored(redis_client)
    for signature in (
        f"v2,{digest}",
        f"v1,{digest}",
        f"V3,{digest}",
        f"v3 {digest}",
        f"v3={digest}",
        f"v3,{digest.upper()}",
        f"v3,{digest[:-1]}",
        f"v3,{digest}0",
        f"v3,{digest} v3,{digest}",
        f"v3,v3,{digest}",
        digest,
    ):
        response = httpx.post(
            hook_url(receiver, settings),
            content=body,
            headers={**good, "webhook-signature": signature},
        )
        assert response.status_code == 401, signature
        assert response.json()["result"] == "unauthorized"
    assert stored(redis_client) == before


def test_malformed_timestamps_are_401(
    receiver: str, settings: Settings, store: JobStore, redis_client: redis.Redis
) -> None:
    """A timestamp that is not plain Unix seconds is refused even when it is signed as sent."""
    make_job(store)
    body = body_for()
    before = stored(redis_client)
    now = int(time.time())
    for stamp in (f"{now}.0", f"+{now}", f"-{now}", f"{now}e0", f"{now:x}", "1" * 13, "now"):
        signature = sign_v3(settings.webhook_secret, "w" * 32, stamp, body)
        headers = {"webhook-id": "w" * 32, "webhook-timestamp": stamp}
        response = httpx.post(
            hook_url(receiver, settings),
            content=body,
            headers={**headers, "webhook-signature": signature},
        )
        assert response.status_code == 401, stamp
    assert stored(redis_client) == before


def test_replayed_webhook_id_changes_nothing(
    receiver: str, settings: Settings, store: JobStore, redis_client: redis.Redis
) -> None:
    """A replay of a handled delivery is `duplicate` (re-signed, other body, other job's
    URL alike), and once outside the time window it is 401; nothing changes after the first."""
    make_job(store)
    make_job(store, "job2", OTHER_PID)
    body = body_for()
    captured = signed_headers(settings, body)
    first = httpx.post(hook_url(receiver, settings), content=body, headers=captured)
    assert first.json()["result"] == "applied"
    after_first = stored(redis_client)

    replay = httpx.post(hook_url(receiver, settings), content=body, headers=captured)
    assert replay.status_code == 200 and replay.json()["result"] == "duplicate"
    failed = body_for(OTHER_PID, status="failed")
    other_job = httpx.post(
        hook_url(receiver, settings, "job2"),
        content=failed,
        headers=signed_headers(settings, failed),  # the same webhook-id, freshly signed
    )
    assert other_job.status_code == 200 and other_job.json()["result"] == "duplicate"
    old = int(time.time()) - settings.webhook_tolerance_s - 1
    stale = httpx.post(
        hook_url(receiver, settings), content=body, headers=signed_headers(settings, body, ts=old)
    )
    assert stale.status_code == 401
    assert stored(redis_client) == after_first
    job2 = store.get("job2")
    assert job2 is not None and job2.state is JobState.SUBMITTED
    assert [f["job_id"] for _, f in store.events()] == ["job1"]


def test_a_delivery_raced_against_itself_applies_once(
    receiver: str, settings: Settings, store: JobStore
) -> None:
    """Twenty copies of one delivery at once, plus twenty distinct ones: one applied, one event."""
    make_job(store)
    body = body_for()
    same = signed_headers(settings, body)
    sends = [same] * 20 + [signed_headers(settings, body, f"{i:032x}") for i in range(20)]
    with httpx.Client() as client, ThreadPoolExecutor(16) as pool:
        results = list(
            pool.map(
                lambda h: client.post(hook_url(receiver, settings), content=body, headers=h), sends
            )
        )
    answers = [r.json()["result"] for r in results]
    assert all(r.status_code == 200 for r in results)
    assert answers.count("applied") == 1
    assert set(answers) <= {"applied", "duplicate", "stale"}
    assert len(store.events()) == 1


def test_two_megabyte_bodies_are_413_and_change_nothing(
    receiver: str, settings: Settings, store: JobStore, redis_client: redis.Redis
) -> None:
    """2 MB with a Content-Length is refused before it is read; chunked, once past the limit."""
    make_job(store)
    before = stored(redis_client)
    big = b'{"id":"' + PID.encode() + b'","pad":"' + b"x" * (2 * 1024 * 1024) + b'"}'
    headers = signed_headers(settings, big)
    sized = httpx.post(hook_url(receiver, settings), content=big, headers=headers)
    assert sized.status_code == 413
    assert sized.json() == {"result": "too_large", "limit_bytes": DEFAULT_WEBHOOK_MAX_BYTES}

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    chunked = httpx.post(hook_url(receiver, settings), content=chunks(), headers=headers)
    assert chunked.status_code == 413
    assert stored(redis_client) == before
    assert httpx.get(f"{receiver}/healthz").status_code == 200


# Signed, token-valid bodies that are not a prediction: each is 400 and stores nothing.
WRONG_SHAPES = [
    b"null",
    b"true",
    b"42",
    b'"completed"',
    b"[]",
    b"{}",
    b'[{"id":"' + PID.encode() + b'","status":"completed"}]',
    b'{"id":"' + PID.upper().encode() + b'","status":"failed"}',
    b'{"id":"' + PID[:-1].encode() + b'","status":"failed"}',
    b'{"id":1234,"status":"failed"}',
    b'{"id":"' + PID.encode() + b'","status":5}',
    b'{"id":"' + PID.encode() + b'","status":""}',
    b'{"id":"' + PID.encode() + b'","status":["completed"]}',
    b'{"id":"' + PID.encode() + b'","status":"completed"}',
    b'{"id":"' + PID.encode() + b'","status":"completed","outputs":[]}',
    b'{"id":"' + PID.encode() + b'","status":"completed","outputs":"https://o.example/1.jpeg"}',
    b'{"id":"' + PID.encode() + b'","status":"completed","outputs":[1]}',
    b'{"id":"' + PID.encode() + b'","status":"completed","outputs":[null]}',
    b'{"id":"' + PID.encode() + b'","status":"completed","outputs":[["https://o"]]}',
    b'{"id":"' + PID.encode() + b'","status":"completed","outputs":["https://o"]',  # truncated
    b"[" * 100_000 + b"]" * 100_000,  # deeper than any recursive parser goes
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
]


@pytest.mark.parametrize("body", WRONG_SHAPES, ids=lambda b: b[:40].decode(errors="replace"))
def test_json_of_the_wrong_shape_is_400(
    body: bytes, receiver: str, settings: Settings, store: JobStore, redis_client: redis.Redis
) -> None:
    """A correctly signed body that is not a usable prediction is 400 with a reason, no change."""
    make_job(store)
    before = stored(redis_client)
    response = httpx.post(
        hook_url(receiver, settings), content=body, headers=signed_headers(settings, body)
    )
    assert response.status_code == 400
    assert response.json()["result"] == "bad_request" and response.json()["error"]
    assert stored(redis_client) == before


def test_unknown_status_is_acknowledged_without_a_change(
    receiver: str, settings: Settings, store: JobStore
) -> None:
    """A well-formed prediction with a status we do not know is not final: 200, job unchanged."""
    make_job(store)
    body = body_for(status="exploded")
    response = httpx.post(
        hook_url(receiver, settings), content=body, headers=signed_headers(settings, body)
    )
    assert response.status_code == 200 and response.json()["result"] == "not_final"
    job = store.get("job1")
    assert job is not None and job.state is JobState.SUBMITTED and job.version == 3
    assert store.events() == []


# --- slow clients against the real gunicorn receiver ---------------------------------------


@pytest.fixture(scope="module")
def gunicorn_receiver(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Settings]]:
    """`kq receiver` (gunicorn, 2 gevent workers) on the session's Redis."""
    settings = Settings(
        redis_url=redis_url,
        webhook_secret="whsec_aG9zdGlsZS10ZXN0LXNlY3JldC0wMTIzNDU2Nzg5",
        secret_key="hostile-test-secret-key-0123456789",
    )
    var_dir: Path = tmp_path_factory.mktemp("hostile")
    config = StackConfig(
        var_dir=var_dir,
        redis_url=redis_url,
        # An API key means "no simulator"; the receiver never calls the provider here.
        wavespeed_api_key="unused-key",
        wavespeed_base_url="http://127.0.0.1:9",
        start_worker=False,
        start_beat=False,
        extra_env={
            "KQ_WEBHOOK_SECRET": settings.webhook_secret,
            "KQ_SECRET_KEY": settings.secret_key,
            "KQ_WEBHOOK_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        },
    )
    with Stack(config, announce=lambda line: None) as stack:
        assert stack.receiver_url is not None
        yield stack.receiver_url, settings


@pytest.mark.parametrize("sending", ["sized", "chunked"])
def test_413_then_the_next_delivery_on_the_same_connection(
    sending: str, gunicorn_receiver: tuple[str, Settings], redis_client: redis.Redis
) -> None:
    """After a 413 on a kept-alive connection the sender's next request still gets its
    answer: the receiver either closes the connection with the 413 (`Connection: close`,
    so the client opens a new one) or reads past the refused body; it never answers
    keep-alive and then hangs up."""
    base, settings = gunicorn_receiver
    store = JobStore(redis_client, result_ttl_s=3600, events_maxlen=1000)
    make_job(store)
    big = b'{"id":"' + PID.encode() + b'","pad":"' + b"x" * (2 * 1024 * 1024) + b'"}'

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    fine = body_for()
    with httpx.Client(timeout=10) as client:
        refused = client.post(
            hook_url(base, settings),
            content=big if sending == "sized" else chunks(),
            headers=signed_headers(settings, big, "b" * 32),
        )
        assert refused.status_code == 413
        keep_alive = refused.headers.get("connection", "keep-alive").lower() != "close"
        following = client.post(
            hook_url(base, settings), content=fine, headers=signed_headers(settings, fine)
        )
    assert following.status_code == 200, keep_alive
    assert following.json()["result"] == "applied"
    job = store.get("job1")
    assert job is not None and job.state is JobState.COMPLETED


def open_slow_request(base: str, path: str, headers: dict[str, str], length: int) -> socket.socket:
    """Send the request line, the headers and one byte of a `length`-byte body; no more."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n{").encode())
    return sock


def status_of(sock: socket.socket, timeout_s: float) -> int | None:
    """The status code the server answers on `sock`, or None if it closes without one."""
    sock.settimeout(timeout_s)
    data = b""
    with sock:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                return None
            data += chunk
    return int(data.split(b" ", 2)[1])


def answered(sock: socket.socket) -> bool:
    """Whether the server has written anything (or closed) on `sock` yet, without waiting."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) is not None
    except BlockingIOError:
        return False
    finally:
        sock.setblocking(True)


def test_slow_body_times_out_while_others_are_served(
    gunicorn_receiver: tuple[str, Settings], redis_client: redis.Redis
) -> None:
    """A client that stalls mid-body gets 408 after the deadline; meanwhile a genuine
    delivery is applied and /healthz answers; the stalled one changes nothing."""
    base, settings = gunicorn_receiver
    store = JobStore(redis_client, result_ttl_s=3600, events_maxlen=1000)
    make_job(store, "slow", OTHER_PID)
    make_job(store)
    body = body_for(OTHER_PID)
    path = f"/webhooks/wavespeed?job=slow&t={job_token(settings.secret_key, 'slow')}"
    slow = [
        open_slow_request(base, path, signed_headers(settings, body, f"{i:032x}"), len(body))
        for i in range(4)
    ]
    fine = body_for()
    applied = httpx.post(
        hook_url(base, settings), content=fine, headers=signed_headers(settings, fine)
    )
    assert applied.status_code == 200 and applied.json()["result"] == "applied"
    assert httpx.get(f"{base}/healthz").status_code == 200
    assert not any(answered(sock) for sock in slow)  # still hanging while those were served
    assert [status_of(sock, BODY_TIMEOUT_S + 10) for sock in slow] == [408] * len(slow)
    job = store.get("slow")
    assert job is not None and job.state is JobState.SUBMITTED
    assert [f["job_id"] for _, f in store.events()] == ["job1"]


def test_many_slow_clients_cannot_take_the_receiver_down(
    gunicorn_receiver: tuple[str, Settings], redis_client: redis.Redis
) -> None:
    """More stalled and trickling clients than server threads: every one is cut off with
    408 within a few deadlines, /healthz answers throughout, and nothing is stored."""
    base, _ = gunicorn_receiver
    before = stored(redis_client)
    path = "/webhooks/wavespeed?job=none&t=" + "0" * 32
    slow = [open_slow_request(base, path, {}, 1000) for _ in range(SLOW_CLIENTS)]
    trickler = open_slow_request(base, path, {}, 1000)
    stop = threading.Event()

    def trickle() -> None:
        # One byte at a time, never finishing: a per-read timeout would never fire.
        while not stop.wait(0.2):
            try:
                trickler.sendall(b" ")
            except OSError:
                return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        health = wait_for(
            lambda: httpx.get(f"{base}/healthz", timeout=BODY_TIMEOUT_S * 3).status_code == 200,
            timeout_s=BODY_TIMEOUT_S * 4,
        )
        assert health
        # Waves of at most 16 at a time, each cut at the deadline.
        waves = -(-(SLOW_CLIENTS + 1) // 16) + 1
        statuses = [status_of(s, BODY_TIMEOUT_S * waves + 10) for s in [*slow, trickler]]
    finally:
        stop.set()
        thread.join(5)
    assert set(statuses) == {408}
    assert stored(redis_client) == before


def test_many_clients_at_once_share_a_few_redis_connections(
    gunicorn_receiver: tuple[str, Settings], redis_client: redis.Redis
) -> None:
    """80 clients connected at once, each delivering a result: every one is applied, on
    at most REDIS_CONNECTIONS Redis connections a receiver process (a gevent worker
    serves every client in a greenlet; a connection each would grow with the clients)."""
    base, settings = gunicorn_receiver
    store = JobStore(redis_client, result_ttl_s=3600, events_maxlen=1000)
    jobs = {f"many-{i}": secrets.token_hex(16) for i in range(80)}
    for job_id, pid in jobs.items():
        make_job(store, job_id, pid)
    clients = [httpx.Client(timeout=30) for _ in jobs]
    barrier = threading.Barrier(len(jobs))

    def deliver(client: httpx.Client, job_id: str) -> str:
        body = body_for(jobs[job_id])
        barrier.wait()  # all connected and sending at once
        answer = client.post(
            hook_url(base, settings, job_id),
            content=body,
            headers=signed_headers(settings, body, secrets.token_hex(16)),
        )
        return str(answer.json()["result"])

    try:
        for client in clients:  # every client holds a connection to the receiver
            assert client.get(f"{base}/healthz").status_code == 200
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(deliver, clients, jobs))
        # Counted while all 80 are still connected: the receiver's two processes (their
        # lent connections, plus the shared pool's few: heartbeat, counters, /healthz)
        # and this test's own.
        connected = len(redis_client.client_list())
    finally:
        for client in clients:
            client.close()
    assert results == ["applied"] * len(jobs)
    assert connected <= 2 * REDIS_CONNECTIONS + 12, connected
