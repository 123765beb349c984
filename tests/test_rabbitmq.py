"""RabbitMQ as the Celery broker (`KQ_BROKER_URL=amqp://…`), the job store on Redis.

The stack tests run real processes (a private redis-server for the job store, the
simulator, the receiver, a worker and beat, started by `Stack`) against the RabbitMQ
server development and CI machines run at 127.0.0.1:5672, on a vhost of this test
session's own, created (guest/guest) through the management HTTP API when its plugin is
on, else with `rabbitmqctl`, and removed afterwards. Where no RabbitMQ answers they
skip; under CI (`CI` set) they fail instead. The configuration tests need no broker.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from celery import Celery
from celery.utils.quorum_queues import detect_quorum_queues
from kombu.connection import Connection

from chaos.invariants import task_job
from chaos.proxy import ProviderProxy
from kq.stack import Stack, StackConfig
from tests.conftest import wait_for
from tests.support import FAST_STACK_ENV, fast_sim_args
from worker import runtime
from worker.celery_app import (
    POLL_QUEUE,
    REDIS_TRANSPORT,
    SUBMIT_QUEUE,
    app,
    broker_transport_for,
    broker_url,
    configure,
)
from worker.domain import Job, JobState
from worker.settings import Settings
from worker.store import QUEUED_CHECK_S, JobStore
from worker.tasks import CHUNK_THREADS, submit

RABBITMQ_HOST = "127.0.0.1"
RABBITMQ_PORT = 5672
MANAGEMENT_API = "http://127.0.0.1:15672/api"
GUEST = ("guest", "guest")
IMAGE = "https://example.com/source.jpg"
# Generous bounds on waits for conditions; never slept through.
ADMIN_TIMEOUT_S = 60.0


# --- configuration (no broker needed) ------------------------------------------------


def test_kq_broker_url_defaults_to_the_redis_url() -> None:
    base = {"KQ_REDIS_URL": "redis://127.0.0.1:6379/0", "KQ_SECRET_KEY": "k"}
    plain = Settings.from_env(base)
    assert plain.broker_url == "" and broker_url(plain) == "redis://127.0.0.1:6379/0"
    rabbit = Settings.from_env({**base, "KQ_BROKER_URL": "amqp://kq:hunter2@mq:5672/kq"})
    assert broker_url(rabbit) == "amqp://kq:hunter2@mq:5672/kq"
    assert rabbit.redis_url == "redis://127.0.0.1:6379/0"  # the job store stays on Redis
    assert "hunter2" not in repr(rabbit)


def test_configure_declares_quorum_queues_on_rabbitmq_and_keeps_redis_as_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    previous = app.conf.broker_url
    redis = Settings(redis_url="redis://127.0.0.1:1/0")
    rabbit = Settings(redis_url="redis://127.0.0.1:1/0", broker_url="amqp://u:p@127.0.0.1:1/v")
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(Celery, "send_task", lambda self, *args, **options: sent.append(options))
    try:
        configure(rabbit)
        assert app.conf.broker_url == "amqp://u:p@127.0.0.1:1/v"
        assert app.conf.broker_transport is None  # kombu's py-amqp, no Redis patch
        assert broker_transport_for("amqp://u:p@127.0.0.1:1/v") is None
        assert app.conf.broker_transport_options == {"confirm_publish": True}
        assert app.conf.worker_detect_quorum_queues is True
        assert app.conf.task_acks_late is True and app.conf.worker_prefetch_multiplier == 1
        queues = app.amqp.queues
        for name in (SUBMIT_QUEUE, POLL_QUEUE):
            assert queues[name].queue_arguments == {"x-queue-type": "quorum"}
            assert queues[name].exchange.type == "topic"  # native delayed delivery needs it
            assert queues[name].durable
        assert detect_quorum_queues(app, "amqp")[0]
        route = app.amqp.router.route
        assert route({}, "kq.poll_due")["queue"].name == POLL_QUEUE
        assert route({}, "kq.submit")["queue"].name == SUBMIT_QUEUE
        assert route({}, "kq.submit_chunk")["queue"].name == SUBMIT_QUEUE
        # A sub-second back-off is sent as 1 s: native delayed delivery counts whole seconds.
        submit.apply_async(args=["j"], queue=SUBMIT_QUEUE, countdown=0.6)
        assert sent[-1]["countdown"] == 1

        configure(redis)
        assert app.conf.broker_url == "redis://127.0.0.1:1/0"
        assert app.conf.broker_transport == REDIS_TRANSPORT
        assert app.conf.broker_transport_options["visibility_timeout"] == 3600.0
        assert not app.amqp.queues[SUBMIT_QUEUE].queue_arguments
        assert not detect_quorum_queues(app, "redis")[0]
        submit.apply_async(args=["j"], queue=SUBMIT_QUEUE, countdown=0.6)
        assert sent[-1]["countdown"] == 0.6
    finally:
        if previous:
            configure(Settings(redis_url="", broker_url=previous))


# --- a private vhost on the local RabbitMQ ---------------------------------------------


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI needs RabbitMQ at {RABBITMQ_HOST}:{RABBITMQ_PORT}")
    pytest.skip(reason)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


class RabbitAdmin:
    """Vhosts and queue listings, through the management HTTP API or `rabbitmqctl`."""

    def __init__(self, via: str) -> None:
        self.via = via  # "http" or "rabbitmqctl"
        self._http = httpx.Client(
            base_url=MANAGEMENT_API, auth=GUEST, timeout=ADMIN_TIMEOUT_S, trust_env=False
        )

    @classmethod
    def find(cls) -> RabbitAdmin | None:
        try:
            overview = httpx.get(
                f"{MANAGEMENT_API}/overview", auth=GUEST, timeout=5, trust_env=False
            )
            if overview.status_code == 200:
                return cls("http")
        except httpx.HTTPError:
            pass
        try:
            subprocess.run(
                ["rabbitmqctl", "-q", "list_vhosts"],
                check=True,
                capture_output=True,
                timeout=ADMIN_TIMEOUT_S,
            )
            return cls("rabbitmqctl")
        except (OSError, subprocess.SubprocessError):
            return None

    def _ctl(self, *args: str) -> str:
        done = subprocess.run(
            ["rabbitmqctl", "-q", *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=ADMIN_TIMEOUT_S,
        )
        return done.stdout

    def add_vhost(self, vhost: str) -> None:
        if self.via == "http":
            path = quote(vhost, safe="")
            self._http.put(f"/vhosts/{path}").raise_for_status()
            grant = {"configure": ".*", "write": ".*", "read": ".*"}
            self._http.put(f"/permissions/{path}/guest", json=grant).raise_for_status()
            return
        self._ctl("add_vhost", vhost)
        self._ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")

    def delete_vhost(self, vhost: str) -> None:
        if self.via == "http":
            self._http.delete(f"/vhosts/{quote(vhost, safe='')}").raise_for_status()
        else:
            self._ctl("delete_vhost", vhost)
        self._http.close()

    def queues(self, vhost: str) -> dict[str, dict[str, Any]]:
        """name -> {"type", "messages"} of every queue in the vhost."""
        if self.via == "http":
            answer = self._http.get(f"/queues/{quote(vhost, safe='')}")
            rows = answer.raise_for_status().json()
        else:
            out = self._ctl(
                "list_queues", "-p", vhost, "name", "type", "messages", "--formatter", "json"
            )
            rows = json.loads(out or "[]")
        return {row["name"]: {"type": row["type"], "messages": row.get("messages")} for row in rows}


@dataclass(frozen=True)
class Rabbit:
    admin: RabbitAdmin
    vhost: str
    url: str


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[Rabbit]:
    """A vhost of this test session's own on the local RabbitMQ, removed afterwards."""
    if not _port_open(RABBITMQ_HOST, RABBITMQ_PORT):
        _unavailable(f"no RabbitMQ answers at {RABBITMQ_HOST}:{RABBITMQ_PORT}")
    admin = RabbitAdmin.find()
    if admin is None:
        _unavailable("RabbitMQ runs, but neither its management API nor rabbitmqctl works here")
    assert admin is not None
    vhost = f"kq-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    admin.add_vhost(vhost)
    url = f"amqp://{GUEST[0]}:{GUEST[1]}@{RABBITMQ_HOST}:{RABBITMQ_PORT}/{quote(vhost, safe='')}"
    try:
        with Connection(url, connect_timeout=5) as conn:  # type: ignore[no-untyped-call]
            conn.ensure_connection(max_retries=3)
        yield Rabbit(admin, vhost, url)
    finally:
        admin.delete_vhost(vhost)


# --- the whole stack on RabbitMQ -------------------------------------------------------


class Harness:
    def __init__(self, stack: Stack, proxy: ProviderProxy, rabbit: Rabbit) -> None:
        self.stack = stack
        self.proxy = proxy
        self.rabbit = rabbit
        self.settings = Settings.from_env({**os.environ, **stack.env})
        assert self.settings.broker_url == rabbit.url
        configure(self.settings)
        self.store: JobStore = runtime.make_store(self.settings)
        self.producer = runtime.make_producer(self.settings)
        assert stack.sim_url is not None
        self.sim = httpx.Client(base_url=stack.sim_url, timeout=10, trust_env=False)

    def sim_config(self, **knobs: Any) -> None:
        self.sim.post("/_sim/config", json=knobs).raise_for_status()

    def paid_tasks(self, ids: list[str]) -> Counter[str]:
        """Tasks the simulator created (each one paid for), per job of `ids`."""
        tasks = self.sim.get("/_sim/tasks").json()["tasks"]
        wanted = set(ids)
        return Counter(job for job in map(task_job, tasks) if job in wanted)

    def enqueue(self, batch_id: str, n: int) -> list[str]:
        items = ({"prompt": f"{batch_id} {i}", "image": IMAGE} for i in range(n))
        receipt = self.producer.enqueue_batch(items, batch_id=batch_id)
        assert receipt.created == n
        return self.store.batch_members(batch_id)

    def wait_terminal(self, ids: list[str], timeout_s: float) -> list[Job]:
        def done() -> list[Job] | None:
            jobs = [j for j in self.store.get_many(ids) if j is not None and j.terminal]
            return jobs if len(jobs) == len(ids) else None

        jobs: list[Job] = wait_for(done, timeout_s=timeout_s, interval_s=0.2)
        return jobs

    def events_per_job(self, ids: list[str]) -> Counter[str]:
        wanted = set(ids)
        return Counter(f["job_id"] for _, f in self.store.events() if f["job_id"] in wanted)


@pytest.fixture(scope="module")
def harness(rabbitmq: Rabbit, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    proxy = ProviderProxy()  # between the stack and the simulator, to hold submit answers
    proxy.start()
    config = StackConfig(
        var_dir=tmp_path_factory.mktemp("rabbit-stack"),
        sim_args=fast_sim_args(29),
        worker_concurrency=2,
        extra_env={
            **FAST_STACK_ENV,
            "KQ_BROKER_URL": rabbitmq.url,
            "KQ_WAVESPEED_BASE_URL": proxy.url,
        },
    )
    try:
        with Stack(config, announce=lambda line: None) as stack:
            proxy.upstream = stack.sim_url
            h = Harness(stack, proxy, rabbitmq)
            yield h
            h.sim.close()
            h.store.redis.close()
            h.producer.close()
    finally:
        proxy.stop()
        # Our pooled connections to the vhost end with it; point the app back at no broker
        # of this module's (the next module configures its own).
        configure(Settings(redis_url="redis://127.0.0.1:1/0"))


@pytest.mark.integration
def test_fifty_jobs_through_rabbitmq_each_paid_once_with_one_event(harness: Harness) -> None:
    """50 jobs with the broker on RabbitMQ: a 5xx burst sends every submit back through
    Celery countdowns (`kq.submit` retries, which quorum queues route through native
    delayed delivery, twice for most), dropped webhooks leave a share to beat's sweep on
    `kq.poll`; all complete well before the poller's 60 s check of queued jobs could
    have stepped in, with one event and one paid task each; Celery's queues are quorum
    queues, and nothing of Celery's is in the job store's Redis."""
    h = harness
    h.sim_config(burst_5xx_s=2.5, drop_webhook_rate=0.3)
    started = time.monotonic()
    try:
        ids = h.enqueue("rabbit-fifty", 50)
        jobs = h.wait_terminal(ids, timeout_s=120)
    finally:
        h.sim_config(burst_5xx_s=0.0, drop_webhook_rate=0.0)
    finished_in = time.monotonic() - started
    assert Counter(j.state for j in jobs) == {JobState.COMPLETED: 50}
    assert h.events_per_job(ids) == dict.fromkeys(ids, 1)
    assert h.paid_tasks(ids) == dict.fromkeys(ids, 1)
    assert any(j.attempts >= 3 for j in jobs), "no `kq.submit` retried itself after a 5xx"
    assert any(j.resolved_by == "poll" for j in jobs), "beat's sweep resolved no job"
    # Retries came back from RabbitMQ's delayed queues, not from the 60 s safety net.
    assert finished_in < QUEUED_CHECK_S, finished_in
    queues = h.rabbit.admin.queues(h.rabbit.vhost)
    assert {name: queues[name]["type"] for name in (SUBMIT_QUEUE, POLL_QUEUE)} == {
        SUBMIT_QUEUE: "quorum",
        POLL_QUEUE: "quorum",
    }
    assert any(name.startswith("celery_delayed_") for name in queues)
    # Redis holds the jobs, not the messages: no kombu lists, no unacked set.
    assert not h.store.redis.exists(SUBMIT_QUEUE, POLL_QUEUE, "unacked", "unacked_index")
    assert not h.store.redis.keys("_kombu.binding.*")


@pytest.mark.integration
def test_worker_killed_mid_submit_loses_no_job_and_pays_none_twice(harness: Harness) -> None:
    """kill -9 of the worker with a submit chunk in hand and submits in flight (their
    answers held after the simulator created the task): RabbitMQ hands the unacked
    message back as soon as the connection drops, so the restarted worker finishes the
    jobs well before the poller's 60 s check of queued jobs; every job ends, with one
    event, and none is paid twice."""
    h = harness
    h.proxy.arm_hold(count=None)  # every submit's answer is held: the worker stalls
    enqueued_at = time.monotonic()
    try:
        ids = h.enqueue("rabbit-kill", 50)
        # Every submit thread of the chunk blocked in a POST whose task exists.
        wait_for(lambda: h.proxy.held_count >= CHUNK_THREADS, timeout_s=30)
        h.stack.kill("worker")
    finally:
        h.proxy.release()
    h.stack.restart("worker")
    jobs = h.wait_terminal(ids, timeout_s=120)
    finished_in = time.monotonic() - enqueued_at
    assert Counter(j.state for j in jobs) == {JobState.COMPLETED: 50}
    assert len({j.prediction_id for j in jobs}) == 50
    assert h.events_per_job(ids) == dict.fromkeys(ids, 1)
    assert h.paid_tasks(ids) == dict.fromkeys(ids, 1)  # no job paid twice
    assert h.proxy.held_count < 50  # most jobs had not been submitted when it died
    # The 60 s safety net (the poller resending jobs left queued) was not what saved them.
    assert finished_in < QUEUED_CHECK_S, finished_in

    def drained() -> bool:
        queues = h.rabbit.admin.queues(h.rabbit.vhost)
        return bool(queues[SUBMIT_QUEUE]["messages"] == 0)

    wait_for(drained, timeout_s=30, interval_s=1.0)
