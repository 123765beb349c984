"""`kq forward`: signed outbound webhooks, against real HTTP endpoints the tests start.

Events are produced the real way (jobs moved by `JobStore.transition`), routed and
delivered by a real `Forwarder` (in a thread, or as a `kq forward` process for the kill -9
test) to real HTTP servers on loopback: one that verifies with `standardwebhooks`' own
`Webhook.verify`, one that answers 500 for a while, one that hangs, one that closes
connections without answering. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from standardwebhooks import Webhook, WebhookVerificationError

from kq.cli import main as kq_main
from tests.conftest import free_port, wait_for
from worker import keys
from worker.alarms import find_alarms, forward_alarms
from worker.domain import EditRequest, JobState
from worker.errors import ConfigError, ValidationError
from worker.forward.engine import ForwardConfig, Forwarder
from worker.forward.health import read_forwarding
from worker.forward.policy import BreakerState, CircuitBreaker, RetryPolicy
from worker.forward.signing import generate_secret, render, sign_headers, webhook_id
from worker.forward.subscribers import SubscriberStore, load_file
from worker.metrics import ForwardCollector, serve_exporter
from worker.snapshot import StatusConfig
from worker.store import JobStore

pytestmark = pytest.mark.integration

REQUEST = EditRequest(prompt="make it blue", image="https://example.com/a.jpg")
# Quick timings for tests: short timeouts, retries in a fraction of a second.
FAST = ForwardConfig(
    timeout_s=1.0,
    concurrency=4,
    retry=RetryPolicy(base_s=0.1, max_delay_s=0.4, retry_for_s=120),
    breaker_threshold=3,
    breaker_cooldown_s=0.2,
    breaker_max_cooldown_s=0.5,
    consumer="test",
    start="0-0",
    poll_interval_s=0.1,
    reload_interval_s=0.2,
    expire_every_s=0.5,
)


def finish(
    store: JobStore, *, batch_id: str = "", state: JobState = JobState.COMPLETED
) -> tuple[str, str]:
    """A job moved to a terminal state through the real transition: (job id, event id)."""
    job_id = uuid.uuid4().hex
    now = time.time()
    assert store.create(job_id, REQUEST, batch_id=batch_id, now=now)
    fields: dict[str, Any] = {"finished_at": now + 1, "resolved_by": "worker"}
    if state is JobState.COMPLETED:  # only a submitted job can complete
        pid = uuid.uuid4().hex
        store.transition(job_id, JobState.SUBMITTING, now=now, fields={"attempts": 1})
        sent = {"prediction_id": pid, "submitted_at": now}
        store.transition(job_id, JobState.SUBMITTED, now=now, fields=sent, expect_prediction_id=pid)
        fields.update(outputs=json.dumps(["https://cdn.example/1.jpg"]), resolved_by="webhook")
    else:
        fields.update(reason="budget", error="x")
    assert store.transition(job_id, state, now=now + 1, fields=fields).applied
    entries: Any = store.redis.xrevrange(keys.EVENTS, count=1)
    return job_id, str(entries[0][0])


# --- a real HTTP endpoint ------------------------------------------------------------------


class Endpoint:
    """An HTTP/1.1 server on loopback; `behave(request)` decides each answer: a status
    code, or None to close the connection without answering. Records every request."""

    def __init__(self, behave: Callable[[Endpoint, dict[str, str], bytes], int | None]) -> None:
        self.behave = behave
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.answered: list[tuple[dict[str, str], bytes, int]] = []
        self.in_progress = 0
        self.release = threading.Event()  # ends any hang
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with endpoint.lock:
                    endpoint.requests.append((headers, body))
                    endpoint.in_progress += 1
                try:
                    status = endpoint.behave(endpoint, headers, body)
                finally:
                    with endpoint.lock:
                        endpoint.in_progress -= 1
                if status is None:
                    self.close_connection = True  # no answer at all
                    return
                payload = b"" if status == 204 else b"ok"  # a 204 has no body
                self.send_response(status)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                with endpoint.lock:
                    endpoint.answered.append((headers, body, status))

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.1,), daemon=True)

    def __enter__(self) -> Endpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def jobs_ok(self) -> set[str]:
        """Job ids answered with a 2xx."""
        with self.lock:
            return {
                json.loads(body)["data"]["job_id"]
                for _h, body, status in self.answered
                if 200 <= status < 300
            }

    def jobs_seen(self) -> set[str]:
        with self.lock:
            return {json.loads(body)["data"]["job_id"] for _h, body in self.requests}


def ok(_e: Endpoint, _h: dict[str, str], _b: bytes) -> int:
    return 204


@contextmanager
def forwarding(
    client: redis.Redis, config: ForwardConfig = FAST, file: Path | None = None
) -> Iterator[Forwarder]:
    """A Forwarder running in a thread until the block ends."""
    forwarder = Forwarder(client, SubscriberStore(client, file), config)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            forwarder.run(stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: forwarder.ready.is_set() or errors, timeout_s=10)
    if errors:
        raise errors[0]
    try:
        yield forwarder
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive()


def owed(client: redis.Redis, sid: str) -> int:
    return int(client.zcard(keys.fwd_due(sid)))


def stats(client: redis.Redis, sid: str) -> dict[str, int]:
    raw: Any = client.hgetall(keys.FWD_STATS)
    return {k.split("|", 1)[1]: int(v) for k, v in raw.items() if k.startswith(f"{sid}|")}


# --- signing -----------------------------------------------------------------------------


def test_deliveries_verify_with_standardwebhooks(
    redis_client: redis.Redis, store: JobStore
) -> None:
    """Each event reaches the endpoint once, signed so that `Webhook.verify` accepts it,
    with the documented body and a webhook-id stable per (event, subscriber)."""
    secret = generate_secret()
    verifier = Webhook(secret)
    verified: list[Any] = []

    def verify(_e: Endpoint, headers: dict[str, str], body: bytes) -> int:
        try:
            verified.append((headers["webhook-id"], verifier.verify(body, headers)))
        except WebhookVerificationError:
            return 401
        return 204

    subs = SubscriberStore(redis_client)
    with Endpoint(verify) as endpoint:
        subs.add("billing", endpoint.url, secret=secret)
        with forwarding(redis_client):
            made = [
                finish(store, batch_id="b1", state=state)
                for state in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)
            ]
            wait_for(lambda: len(verified) == 3)
            wait_for(lambda: owed(redis_client, "billing") == 0)
    by_job = {payload["data"]["job_id"]: (msg_id, payload) for msg_id, payload in verified}
    for (job_id, event_id), state in zip(made, ("completed", "failed", "cancelled"), strict=True):
        msg_id, payload = by_job[job_id]
        assert msg_id == webhook_id("billing", event_id) == f"msg_{event_id}_billing"
        assert payload["type"] == f"job.{state}"
        assert payload["timestamp"].endswith("Z")
        assert payload["data"]["id"] == event_id and payload["data"]["state"] == state
        assert payload["data"]["batch_id"] == "b1"
    assert len(endpoint.requests) == 3
    assert stats(redis_client, "billing")["delivered"] == 3
    assert redis_client.hlen(keys.fwd_body("billing")) == 0  # nothing left behind


def test_rotation_signs_with_old_and_new_secret_until_the_old_expires(
    redis_client: redis.Redis,
) -> None:
    """During a rotation every request carries a signature per active secret, so a
    receiver on either secret verifies it; with --keep-old 0 only the new one signs."""
    subs = SubscriberStore(redis_client)
    first = subs.add("s1", "https://example.com/h")
    old = first.secrets[0].value
    rotated = subs.rotate_secret("s1", keep_old_s=3600)
    new = rotated.secrets[0].value
    assert new != old and rotated.active_secrets(time.time()) == (new, old)
    body = '{"type":"job.completed"}'
    headers = sign_headers("msg_1-0_s1", body, rotated.active_secrets(time.time()), time.time())
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        assert Webhook(secret).verify(body, headers) == {"type": "job.completed"}
    later = subs.rotate_secret("s1", keep_old_s=0)
    headers = sign_headers("msg_1-0_s1", body, later.active_secrets(time.time()), time.time())
    assert len(headers["webhook-signature"].split(" ")) == 1
    Webhook(later.secrets[0].value).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new).verify(body, headers)
    # Expired secrets stop signing by themselves too.
    soon = subs.rotate_secret("s1", keep_old_s=3600, now=time.time() - 7200)
    assert soon.active_secrets(time.time()) == (soon.secrets[0].value,)


# --- endpoints that misbehave ----------------------------------------------------------


def test_endpoint_answering_500_for_a_while_gets_everything(
    redis_client: redis.Redis, store: JobStore
) -> None:
    """500s are retried with back-off (same webhook-id and body each time) until the
    endpoint recovers; then every event is delivered and the endpoint counts as healthy."""
    healthy_at = time.monotonic() + 1.5

    def flaky(_e: Endpoint, _h: dict[str, str], _b: bytes) -> int:
        return 500 if time.monotonic() < healthy_at else 200

    with Endpoint(flaky) as endpoint:
        SubscriberStore(redis_client).add("flaky", endpoint.url)
        with forwarding(redis_client):
            made = [finish(store) for _ in range(5)]
            wait_for(lambda: endpoint.jobs_ok() == {j for j, _ in made}, timeout_s=20)
            wait_for(lambda: owed(redis_client, "flaky") == 0)
    counts = stats(redis_client, "flaky")
    assert counts["http_5xx"] >= 5 and counts["delivered"] >= 5
    ids: dict[str, set[str]] = {}
    bodies: dict[str, set[bytes]] = {}
    for headers, body in endpoint.requests:
        job_id = json.loads(body)["data"]["job_id"]
        ids.setdefault(job_id, set()).add(headers["webhook-id"])
        bodies.setdefault(job_id, set()).add(body)
    assert all(len(v) == 1 for v in ids.values())  # stable across retries
    assert all(len(v) == 1 for v in bodies.values())
    fwd = read_forwarding(redis_client)
    (ep,) = fwd.endpoints
    assert ep.failing_for_s is None and ep.pending == 0 and ep.dead == 0


def test_hanging_endpoint_does_not_delay_another(
    redis_client: redis.Redis, store: JobStore
) -> None:
    """An endpoint that never answers fills its own slots and times out; another
    endpoint gets every event at once. Released, the hung one gets them all too."""
    config = replace(FAST, timeout_s=3.0)

    def hang(e: Endpoint, _h: dict[str, str], _b: bytes) -> int:
        e.release.wait(30)
        return 200

    with Endpoint(hang) as stuck, Endpoint(ok) as fine:
        subs = SubscriberStore(redis_client)
        subs.add("stuck", stuck.url)
        subs.add("fine", fine.url)
        with forwarding(redis_client, config):
            started = time.monotonic()
            made = {finish(store)[0] for _ in range(8)}
            wait_for(lambda: fine.jobs_ok() == made, timeout_s=10)
            took = time.monotonic() - started
            assert took < config.timeout_s  # not one of its timeouts was waited for
            wait_for(lambda: stuck.in_progress == config.concurrency)  # its slots, all held
            wait_for(lambda: stats(redis_client, "stuck").get("timeout", 0) >= 4, timeout_s=15)
            assert owed(redis_client, "stuck") == 8  # waiting, not lost
            stuck.behave = ok
            stuck.release.set()
            wait_for(lambda: owed(redis_client, "stuck") == 0, timeout_s=20)
    assert made <= stuck.jobs_seen()
    assert stats(redis_client, "stuck")["delivered"] >= 8


def test_connections_closed_without_an_answer_are_retried(
    redis_client: redis.Redis, store: JobStore
) -> None:
    """A server that drops the connection without answering counts as a connection
    error; the deliveries are retried on fresh connections and all arrive."""
    dropped = {"n": 0}

    def rude(e: Endpoint, _h: dict[str, str], _b: bytes) -> int | None:
        with e.lock:
            if dropped["n"] < 4:
                dropped["n"] += 1
                return None
        return 200

    with Endpoint(rude) as endpoint:
        SubscriberStore(redis_client).add("rude", endpoint.url)
        with forwarding(redis_client):
            made = {finish(store)[0] for _ in range(4)}
            wait_for(lambda: endpoint.jobs_ok() == made, timeout_s=20)
            wait_for(lambda: owed(redis_client, "rude") == 0)
    assert stats(redis_client, "rude")["connection_error"] == 4


def test_filters_by_batch_prefix_and_state(redis_client: redis.Redis, store: JobStore) -> None:
    """A subscriber with a filter gets only its events; one without gets all."""
    with Endpoint(ok) as picky, Endpoint(ok) as everything:
        subs = SubscriberStore(redis_client)
        subs.add("picky", picky.url, batch_prefix="cat-", states=["completed", "failed"])
        subs.add("all", everything.url)
        with forwarding(redis_client):
            wanted = {
                finish(store, batch_id="cat-1")[0],
                finish(store, batch_id="cat-2", state=JobState.FAILED)[0],
            }
            others = {
                finish(store, batch_id="cat-3", state=JobState.CANCELLED)[0],
                finish(store, batch_id="dog-1")[0],
                finish(store)[0],
            }
            wait_for(lambda: everything.jobs_ok() == wanted | others)
            wait_for(lambda: picky.jobs_ok() == wanted)
            time.sleep(0.3)  # a wrongly routed one would arrive within this
    assert picky.jobs_seen() == wanted


# --- retry window, dead list, CLI ------------------------------------------------------


@pytest.fixture
def kq_env(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KQ_REDIS_URL", redis_url)
    monkeypatch.setenv("KQ_VAR_DIR", str(tmp_path))
    monkeypatch.delenv("KQ_FORWARD_SUBSCRIBERS_FILE", raising=False)


@pytest.mark.usefixtures("kq_env")
def test_retry_window_over_parks_then_dlq_replay_delivers(
    redis_client: redis.Redis, store: JobStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """Past its retry window a delivery is parked in the subscriber's dead list;
    `kq forward dlq list` shows it and `dlq replay --all` delivers it."""
    config = replace(FAST, retry=RetryPolicy(base_s=0.1, max_delay_s=0.2, retry_for_s=0.5))
    broken = {"yes": True}

    def maybe(_e: Endpoint, _h: dict[str, str], _b: bytes) -> int:
        return 503 if broken["yes"] else 200

    with Endpoint(maybe) as endpoint:
        SubscriberStore(redis_client).add("shop", endpoint.url)
        with forwarding(redis_client, config):
            made = {finish(store)[0] for _ in range(3)}
            wait_for(lambda: redis_client.zcard(keys.fwd_dead("shop")) == 3, timeout_s=15)
            assert owed(redis_client, "shop") == 0
            assert kq_main(["forward", "dlq", "list", "--json"]) == 0
            out = capsys.readouterr().out.splitlines()  # the forwarder logs here too
            listed = [json.loads(line) for line in out if line.startswith("{")]
            assert {d["job_id"] for d in listed} == made
            assert all(d["attempts"] >= 1 and "503" in d["last_error"] for d in listed)
            broken["yes"] = False
            assert kq_main(["forward", "dlq", "replay", "shop", "--all"]) == 0
            assert "3 delivery(ies) queued again" in capsys.readouterr().out
            wait_for(lambda: endpoint.jobs_ok() == made, timeout_s=10)
            wait_for(lambda: owed(redis_client, "shop") == 0)
    assert redis_client.zcard(keys.fwd_dead("shop")) == 0
    assert stats(redis_client, "shop")["dead_lettered"] == 3
    assert kq_main(["forward", "dlq", "replay", "shop"]) == 2  # neither ids nor --all


@pytest.mark.usefixtures("kq_env")
def test_subscribers_cli_add_list_rotate_remove(
    redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kq subscribers`: add prints the secret once, list masks it, rotate keeps the old
    one signing for a while, remove drops the subscriber and its queue."""
    argv = ["subscribers", "add", "crm", "--url", "https://crm.example.com/h"]
    assert kq_main([*argv, "--state", "completed", "--json"]) == 0
    added = json.loads(capsys.readouterr().out)
    secret = added["secret"]
    assert secret.startswith("whsec_") and added["states"] == ["completed"]
    assert kq_main(argv) == 2  # the id is taken
    assert "already exists" in capsys.readouterr().err
    assert kq_main(["subscribers", "add", "Bad Id!", "--url", "ftp://x"]) == 2
    err = capsys.readouterr().err
    assert "id:" in err and "url:" in err
    assert kq_main(["subscribers", "list"]) == 0
    out = capsys.readouterr().out
    assert "crm" in out and secret not in out and secret[:10] in out
    assert kq_main(["subscribers", "rotate-secret", "crm", "--keep-old", "2h", "--json"]) == 0
    rotated = json.loads(capsys.readouterr().out)
    assert rotated["secret"] != secret and len(rotated["secrets"]) == 2
    redis_client.zadd(keys.fwd_due("crm"), {"1-0": 0})
    assert kq_main(["subscribers", "remove", "crm"]) == 0
    assert "1 pending" in capsys.readouterr().out
    assert not redis_client.exists(keys.fwd_due("crm"))
    assert kq_main(["subscribers", "remove", "crm"]) == 2


def test_subscribers_from_a_file(
    redis_client: redis.Redis, store: JobStore, tmp_path: Path
) -> None:
    """Subscribers listed in KQ_FORWARD_SUBSCRIBERS_FILE (TOML) are served like stored
    ones; a bad file is a clear ConfigError, an id in both places too."""
    secret = generate_secret()
    path = tmp_path / "subscribers.toml"
    with Endpoint(ok) as endpoint:
        path.write_text(
            f'[[subscribers]]\nid = "warehouse"\nurl = "{endpoint.url}"\n'
            f'secret = "{secret}"\nstates = ["completed"]\nconcurrency = 2\n'
        )
        (sub,) = load_file(path).values()
        assert sub.source == "file" and sub.concurrency == 2
        with forwarding(redis_client, file=path):
            job_id, _ = finish(store)
            finish(store, state=JobState.FAILED)
            wait_for(lambda: endpoint.jobs_ok() == {job_id})
        headers, body, _ = endpoint.answered[0]
        Webhook(secret).verify(body, headers)
    fwd = read_forwarding(redis_client, extra=[sub])
    assert [(e.subscriber, e.source) for e in fwd.endpoints] == [("warehouse", "file")]
    store_with_file = SubscriberStore(redis_client, path)
    with pytest.raises(ValidationError, match="already defined"):
        store_with_file.add("warehouse", "https://example.com/h")
    redis_client.hset(keys.FWD_SUBSCRIBERS, "warehouse", json.dumps(sub.to_record()))
    with pytest.raises(ConfigError, match="warehouse"):
        store_with_file.all()
    path.write_text('[[subscribers]]\nid = "x"\nurl = "https://e.com"\nsecret = "nope"\n')
    with pytest.raises(ConfigError, match=r"secrets\[0\]"):
        load_file(path)


# --- status, metrics, alarm ----------------------------------------------------------------


def test_status_metrics_and_failing_alarm(
    redis_client: redis.Redis, store: JobStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failing endpoint shows pending deliveries, their age and its failing time;
    metrics carry deliveries by endpoint and outcome; after 10 minutes the
    `forward_failing` alarm fires (in `find_alarms` too when the snapshot has it)."""
    with Endpoint(lambda *_: 500) as bad, Endpoint(ok) as good:
        subs = SubscriberStore(redis_client)
        subs.add("bad", bad.url)
        subs.add("good", good.url)
        with forwarding(redis_client):
            made = {finish(store)[0] for _ in range(2)}
            wait_for(lambda: good.jobs_ok() == made)
            wait_for(lambda: stats(redis_client, "bad").get("http_5xx", 0) >= 2)
            fwd = read_forwarding(redis_client)
            assert fwd.forwarders == 0  # heartbeats come from `kq forward` itself
            port = free_port()
            server, _thread = serve_exporter(
                ForwardCollector(lambda: read_forwarding(redis_client)), port=port
            )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
                    text = resp.read().decode()
            finally:
                server.shutdown()
                server.server_close()
    by_id = {e.subscriber: e for e in fwd.endpoints}
    assert by_id["bad"].pending == 2 and by_id["bad"].failing_for_s is not None
    assert by_id["bad"].oldest_undelivered_s is not None
    assert "HTTP 500" in by_id["bad"].last_error
    assert by_id["good"].pending == 0 and by_id["good"].failing_for_s is None
    assert by_id["good"].deliveries["delivered"] == 2
    assert 'kq_forward_deliveries_total{endpoint="good",outcome="delivered"} 2.0' in text
    assert 'kq_forward_deliveries_total{endpoint="bad",outcome="http_5xx"}' in text
    assert 'kq_forward_oldest_undelivered_seconds{endpoint="bad"}' in text
    assert 'kq_alarm{name="forward_failing"} 0.0' in text
    cfg = StatusConfig()
    assert forward_alarms(fwd, cfg) == ()
    later = read_forwarding(redis_client, now=time.time() + cfg.forward_failing_s + 1)
    (alarm,) = forward_alarms(later, cfg)
    assert alarm.name.value == "forward_failing" and "bad" in alarm.message
    assert "good" not in alarm.message
    from worker.status import collect

    snap = collect(redis_client, deadline_s=3600, webhooks_enabled=False)
    assert "forward" in snap.to_json()  # a key added; the others are unchanged
    names = {a.name.value for a in find_alarms(replace(snap, forward=later), {}, cfg)}
    assert "forward_failing" in names


@pytest.mark.usefixtures("kq_env")
def test_kq_forward_status_command(
    redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kq forward status` names each subscriber with its counts; --json is parseable."""
    SubscriberStore(redis_client).add("ops", "https://ops.example.com/h")
    assert kq_main(["forward", "status"]) == 0
    out = capsys.readouterr().out
    assert "ops" in out and "pending 0" in out
    assert kq_main(["forward", "status", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["endpoints"][0]["subscriber"] == "ops" and data["alarms"] == []


# --- kill -9 ----------------------------------------------------------------------------


def test_kill_9_mid_delivery_loses_nothing(
    redis_client: redis.Redis, store: JobStore, redis_url: str, tmp_path: Path
) -> None:
    """A `kq forward` process killed with SIGKILL while deliveries are in flight, then
    started again: every event is delivered at least once, and nothing stays queued."""

    def slow(_e: Endpoint, _h: dict[str, str], _b: bytes) -> int:
        time.sleep(0.2)
        return 200

    env = {
        **os.environ,
        "KQ_REDIS_URL": redis_url,
        "KQ_VAR_DIR": str(tmp_path),
        "KQ_FORWARD_TIMEOUT_S": "1",
        "KQ_FORWARD_RETRY_BASE_S": "0.1",
        "KQ_FORWARD_CONCURRENCY": "2",
        "KQ_LOG_FORMAT": "json",
    }
    env.pop("KQ_FORWARD_SUBSCRIBERS_FILE", None)
    argv = [sys.executable, "-m", "kq.cli", "forward", "--consumer", "f1", "--since", "beginning"]
    log = (tmp_path / "forward.log").open("w")
    with Endpoint(slow) as endpoint:
        SubscriberStore(redis_client).add("sink", endpoint.url)
        made = {finish(store)[0] for _ in range(20)}
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: len(endpoint.jobs_ok()) >= 4 and endpoint.in_progress, timeout_s=20)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            lost_in_flight = endpoint.jobs_seen() - endpoint.jobs_ok()
            assert len(endpoint.jobs_ok()) < len(made)  # killed half-way
            made |= {finish(store)[0] for _ in range(10)}  # written while it is down
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
            # Leased deliveries come back once their lease (13 s here) has run out.
            wait_for(lambda: endpoint.jobs_ok() >= made, timeout_s=60)
            wait_for(lambda: owed(redis_client, "sink") == 0, timeout_s=10)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
            log.close()
    assert endpoint.jobs_ok() == made
    assert lost_in_flight <= endpoint.jobs_ok()
    pending: Any = redis_client.xpending(keys.EVENTS, "kq-forward")
    assert pending["pending"] == 0


# --- pure parts --------------------------------------------------------------------------


def test_retry_schedule_is_about_a_day() -> None:
    """Defaults: 10 s doubling to an hour, for 24 h: about 32 attempts; jitter +/-25 %."""
    policy = RetryPolicy()
    waits = policy.schedule()
    assert waits[:4] == [10, 20, 40, 80] and max(waits) == 3600
    assert len(waits) + 1 == 32 and 23 * 3600 < sum(waits) <= 24 * 3600
    assert policy.delay(3, lambda: 0.0) == 30 and policy.delay(3, lambda: 0.999) < 50
    assert policy.next_attempt(40, first_at=0, now=86_000, rand=lambda: 0.5) is None
    assert policy.next_attempt(1, first_at=0, now=0, rand=lambda: 0.5) == 10


def test_circuit_breaker_opens_probes_and_closes() -> None:
    """Closed: full concurrency; after the threshold of failures: open (nothing); after
    the cool-down one probe; its failure doubles the cool-down, its success closes."""
    now = [0.0]
    breaker = CircuitBreaker(threshold=2, cooldown_s=1, max_cooldown_s=3, clock=lambda: now[0])
    assert breaker.allowance(4, 1) == (3, False)
    breaker.record(False)
    breaker.record(False)
    assert breaker.state is BreakerState.OPEN and breaker.allowance(4, 0) == (0, False)
    now[0] = 1.0
    assert breaker.allowance(4, 0) == (1, True)
    assert breaker.allowance(4, 0) == (0, False)  # one probe at a time
    breaker.record(False)
    assert breaker.seconds_until_probe() == 2.0  # doubled
    now[0] = 3.0
    assert breaker.allowance(4, 0) == (1, True)
    breaker.release_probe()  # nothing was due
    assert breaker.allowance(4, 0) == (1, True)
    breaker.record(True)
    assert breaker.state is BreakerState.CLOSED and breaker.allowance(4, 0) == (4, False)


def test_body_is_the_event_as_json(store: JobStore) -> None:
    """The body is `{type, timestamp, data}` with `data` as `kq events --json` has it."""
    from worker.events import decode_event

    finish(store, batch_id="b")
    ((entry_id, raw),) = store.events()
    event = decode_event(entry_id, raw)
    body = json.loads(render(event))
    assert body["type"] == "job.completed" and body["data"] == json.loads(
        json.dumps(event.to_dict())
    )
