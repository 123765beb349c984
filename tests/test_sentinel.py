"""The whole stack follows Redis failovers through Sentinel (issue 14), on one host.

A private primary + replica + three Sentinels (`chaos.redis_ha`), and the real stack
(worker, beat, receiver, simulator) pointed at the Sentinels with KQ_REDIS_SENTINELS.
Beside them `kq api`, `kq dashboard`, `kq metrics` and `kq forward`. While batches are
being processed:

1. `SENTINEL FAILOVER`: the replica is promoted, the old primary demoted;
2. kill -9 of the old primary (a replica by then): the new primary has no replica, so
   submits are put back unsent (Redis WAIT is not confirmed) until it is started again;
3. kill -9 of the current primary: the Sentinels promote the other server; the receiver
   answers 503 meanwhile and 200 again after, on its own.

Then the invariants, against the simulator's ground truth: every job terminal, exactly
one event each, no job paid twice, outputs from the job's own task, the provider cap held,
no slot or gauge leaked. No process of the stack is restarted. Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from kombu import Connection, Consumer, Exchange, Queue

from chaos import ha_checks, invariants
from chaos.redis_ha import RedisHA, redis_binary
from kq.procs import free_port
from kq.stack import Stack, StackConfig
from tests.conftest import wait_for
from tests.support import FAST_STACK_ENV
from tests.test_redis_restart import _spawn_http
from worker import runtime, telemetry
from worker.celery_app import SENTINEL_TRANSPORT, configure
from worker.forward.health import ROLE as FORWARD_ROLE
from worker.settings import Settings
from worker.store import JobStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

if redis_binary() is None:
    if os.environ.get("CI"):
        pytest.fail("redis-server is required in CI", pytrace=False)
    pytest.skip("redis-server is not installed", allow_module_level=True)

IMAGE = "https://example.com/source.jpg"
BATCH = 150
MAX_IN_FLIGHT = 12
# Jobs whose Celery message was lost with a primary are resent by the poller's queued
# check (about a minute); the rest end within seconds. Bounds a wait, never slept through.
SETTLE_S = 300.0

API_TOKEN = "api-token-for-the-sentinel-test"
OPS_TOKEN = "ops-token-for-the-sentinel-test"

STACK_ENV = {
    **FAST_STACK_ENV,
    "KQ_API_TOKEN": API_TOKEN,
    "KQ_OPS_TOKEN": OPS_TOKEN,
    "KQ_AMBIGUOUS_GRACE_S": "5",
    "KQ_AMBIGUOUS_SETTLE_S": "10",
    "KQ_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT),
    "KQ_REDIS_WAIT_TIMEOUT_MS": "300",
}


def sim_args(seed: int) -> tuple[str, ...]:
    return (
        "--seed", str(seed),
        "--inference-time", "0.3",
        "--queue-delay", "0.3",
        # WaveSpeed's own retry schedule (1, 2, 4 s) outlasts a failover.
        "--webhook-retry-base", "1.0",
        "--webhook-timeout", "2",
    )  # fmt: skip


@contextlib.contextmanager
def redis_ha(workdir: Path) -> Iterator[RedisHA]:
    workdir.mkdir(parents=True)
    ha = RedisHA(
        workdir,
        data_ports=[free_port("127.0.0.1") for _ in range(2)],
        sentinel_ports=[free_port("127.0.0.1") for _ in range(3)],
    )
    try:
        ha.start()
        yield ha
    finally:
        ha.stop()


class HealthWatch:
    """Asks the receiver's /healthz every 50 ms; keeps (time, status) of each answer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="healthz-watch", daemon=True)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with httpx.Client(timeout=3, trust_env=False) as http:
            while not self._stop.is_set():
                try:
                    status = http.get(self.url).status_code
                except httpx.HTTPError:
                    status = 0
                self.answers.append((time.time(), status))
                self._stop.wait(0.05)

    def statuses_since(self, since: float) -> list[int]:
        return [status for at, status in list(self.answers) if at >= since]


def start_readers(stack: Stack) -> dict[str, str]:
    """`kq api`, `kq dashboard`, `kq metrics` and `kq forward` beside the stack, on the
    same Sentinel settings; returns their base URLs."""
    urls = {
        "api": _spawn_http(stack, "api", ["api", "--workers", "1", "--threads", "4"], "/healthz"),
        "dashboard": _spawn_http(stack, "dashboard", ["dashboard"], "/healthz"),
        "metrics": _spawn_http(stack, "metrics", ["metrics"], "/metrics"),
    }
    port = free_port("127.0.0.1")
    urls["forward"] = f"http://127.0.0.1:{port}"
    argv = [
        sys.executable, "-m", "kq.cli", "forward", "--consumer", "sentinel-test",
        "--metrics-host", "127.0.0.1", "--metrics-port", str(port),
    ]  # fmt: skip
    stack._spawn("forward", argv, lambda _proc: _http_ok(urls["forward"] + "/metrics"))
    return urls


def readers_work_again(stack: Stack, urls: dict[str, str], store: JobStore) -> str:
    """After the failovers, with no restart: the API takes a job, the dashboard and both
    metrics endpoints answer, the forwarder writes its heartbeat again. Returns the job."""
    headers = {"Authorization": f"Bearer {API_TOKEN}"}

    def api_accepts() -> str | None:
        try:
            answer = httpx.post(
                f"{urls['api']}/v1/jobs",
                json={"prompt": "via api", "image": IMAGE},
                headers=headers,
                timeout=5,
                trust_env=False,
            )
        except httpx.HTTPError:
            return None
        return str(answer.json()["job_id"]) if answer.status_code == 201 else None

    job_id: str = wait_for(api_accepts, timeout_s=30, interval_s=0.2)
    ops = {"Authorization": f"Bearer {OPS_TOKEN}"}
    wait_for(lambda: _http_ok(urls["dashboard"] + "/api/status", ops), timeout_s=30)
    wait_for(lambda: _http_ok(urls["metrics"] + "/metrics"), timeout_s=30)
    wait_for(lambda: _http_ok(urls["forward"] + "/metrics"), timeout_s=30)
    beat = runtime.heartbeat_key(FORWARD_ROLE, stack.procs["forward"].pid)
    store.redis.delete(beat)
    wait_for(lambda: store.redis.exists(beat), timeout_s=30)
    return job_id


def _http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        return httpx.get(url, headers=headers, timeout=3, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def test_every_process_follows_sentinel_failovers(tmp_path: Path) -> None:
    """A forced failover, a replica killed (submits held back, not sent), and the
    primary killed (the receiver answers 503, then recovers), all mid-run: every job ends
    terminal with one event, none is paid twice, and no process is restarted; the API,
    dashboard, metrics and forwarder work afterwards as they are."""
    with redis_ha(tmp_path / "redis") as ha:
        first = ha.primary()
        assert first is not None
        env = {**STACK_ENV, "KQ_REDIS_SENTINELS": ha.sentinels, "KQ_REDIS_MASTER_NAME": "kq"}
        config = StackConfig(
            var_dir=tmp_path / "var",
            redis_url=ha.url(first),
            sim_args=sim_args(41),
            worker_concurrency=4,
            extra_env=env,
        )
        with Stack(config, announce=lambda line: None) as stack:
            settings = Settings.from_env({**os.environ, **stack.env})
            assert settings.redis_sentinels and settings.redis_wait_replicas == 1
            configure(settings)
            store = runtime.make_store(settings)
            producer = runtime.make_producer(settings)
            readers = start_readers(stack)
            pids = {name: proc.pid for name, proc in stack.procs.items()}
            ids: list[str] = []
            prompts: dict[str, str] = {}
            timeline: list[str] = []
            start = time.time()

            def mark(what: str) -> None:
                timeline.append(f"{time.time() - start:6.1f} s  {what}")

            def enqueue(tag: str) -> list[str]:
                items = [{"prompt": f"{tag} {i}", "image": IMAGE, "seed": i} for i in range(BATCH)]
                receipt = producer.enqueue_batch(items)
                members = store.batch_members(receipt.batch_id)
                ids.extend(members)
                prompts.update({m: f"{tag} {i}" for i, m in enumerate(members)})
                mark(f"enqueued batch {tag} ({len(members)} jobs)")
                return members

            def submitted(members: list[str], at_least: int) -> bool:
                jobs = store.get_many(members)
                return sum(1 for j in jobs if j is not None and j.prediction_id) >= at_least

            def unreplicated() -> int:
                return int(telemetry.totals(store.redis).get("submit.unreplicated", 0))

            with HealthWatch(f"{stack.receiver_url}/healthz") as health:
                # 1. A forced failover while batch a is being submitted.
                batch_a = enqueue("a")
                wait_for(lambda: submitted(batch_a, 30), timeout_s=60, interval_s=0.05)
                old, new = ha.failover()
                mark(f"SENTINEL FAILOVER: {old} -> {new}")
                ha.wait(lambda: ha.replicas_of(new) >= 1, 60, "the old primary to follow")
                mark(f"{old} is a replica of {new}")

                # 2. The only replica dies: submits wait for it, unsent.
                batch_b = enqueue("b")
                wait_for(lambda: submitted(batch_b, 20), timeout_s=60, interval_s=0.05)
                held_before = unreplicated()
                ha.kill(old)
                mark(f"kill -9 the old primary {old} (the only replica)")
                wait_for(lambda: unreplicated() > held_before, timeout_s=30, interval_s=0.1)
                mark(f"submits held back unsent: {unreplicated() - held_before} so far")
                ha.restart(old)
                ha.wait(lambda: ha.replicas_of(new) >= 1, 60, "the replica to come back")
                mark(f"{old} restarted, a replica again")

                # 3. The primary dies: the Sentinels promote the replica by themselves.
                batch_c = enqueue("c")
                wait_for(lambda: submitted(batch_c, 20), timeout_s=60, interval_s=0.05)
                crash = time.time()
                ha.kill(new)
                mark(f"kill -9 the primary {new}")
                ha.wait(lambda: ha.primary() == old, 60, "the Sentinels to promote the replica")
                mark(f"Sentinels promoted {old}")
                ha.wait(lambda: ha.settled_on(old), 60, "every Sentinel to end the failover")
                wait_for(lambda: 503 in health.statuses_since(crash), timeout_s=30)
                wait_for(
                    lambda: health.statuses_since(time.time() - 0.5)[-1:] == [200], timeout_s=30
                )
                mark("receiver answers 200 again")
                ha.restart(new)
                # A Sentinel converts it after 8 s of reports; a Sentinel that lost 2 s to a
                # busy machine pauses 30 s (TILT); the primary delays a full sync 5 s.
                ha.wait(lambda: ha.replicas_of(old) >= 1, 120, "the crashed server to follow")
                mark(f"{new} restarted, a replica again")

                def settled() -> bool:
                    gone = {n: p for n, p in pids.items() if stack.procs[n].pid != p}
                    assert not gone and all(p.alive for p in stack.procs.values()), gone
                    return all(j is not None and j.terminal for j in store.get_many(ids))

                wait_for(settled, timeout_s=SETTLE_S, interval_s=0.5)
                mark("every job terminal")
                during = health.statuses_since(crash)
                via_api = readers_work_again(stack, readers, store)
                ids.append(via_api)
                prompts[via_api] = "via api"
                wait_for(settled, timeout_s=60, interval_s=0.2)
                mark("api, dashboard, metrics and forward answer; a job via the api done")

            ev = ha_checks.gather(store, settings, stack.sim_url, ids, prompts)
            checks = ha_checks.check_failover_run(ev, MAX_IN_FLIGHT)
            report = "\n".join(timeline) + "\n" + invariants.render(checks)
            print(report)
            assert all(check.ok for check in checks), report
            assert unreplicated() > 0
            assert during.count(503) >= 1 and during[-1] == 200, report
            runtime.close_redis(store.redis)
            producer.close()


# --- kombu's closed-connection bug, through the Sentinel transport ---------------------------


def _half_closed_sentinel_connection(ha: RedisHA, transport: str) -> tuple[Connection, object]:
    """As `tests/test_redis_restart._half_closed_connection`, through the Sentinels: a
    task delivered and not acked, fanout consumers on two channels, then Redis goes."""
    tag = uuid.uuid4().hex[:8]
    url = ";".join(f"sentinel://127.0.0.1:{port}/0" for port in ha.sentinel_ports)
    conn = Connection(url, transport=transport, transport_options={"master_name": "kq"})
    work = Queue(f"kq.test.work.{tag}")
    with conn.Producer() as producer:
        producer.publish({"job": 1}, routing_key=work.name, declare=[work])
    got: list[object] = []

    def broadcast(name: str) -> Queue:
        return Queue(name, Exchange(name, type="fanout"), auto_delete=True)

    Consumer(
        conn.default_channel,
        [work, broadcast(f"kq.test.a.{tag}")],
        callbacks=[lambda _body, message: got.append(message)],
    ).consume()
    Consumer(conn.channel(), [broadcast(f"kq.test.b.{tag}")]).consume()
    while not got:
        conn.drain_events(timeout=5)
    return conn, got[0]


@pytest.mark.parametrize("guarded", [True, False], ids=["ours", "stock-kombu"])
def test_sentinel_channel_left_by_collect(tmp_path: Path, guarded: bool) -> None:
    """Our Sentinel transport turns kombu's AttributeError on a collected connection into
    a connection error Celery handles; stock kombu's Sentinel channel still crashes (the
    canary: when it stops failing, `worker.celery_app._SentinelChannel` can go)."""
    transport = SENTINEL_TRANSPORT if guarded else "sentinel"
    with redis_ha(tmp_path / "redis") as ha:
        conn, _message = _half_closed_sentinel_connection(ha, transport)
        for port in ha.data_ports:
            ha.kill(port)
        conn.collect()
        if guarded:
            conn.close()  # Celery: ignore_errors(connection, connection.close)
        else:
            with pytest.raises(AttributeError):
                conn.close()
