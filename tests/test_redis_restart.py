"""Every process survives Redis restarting under it (issue 10, defect 2).

- The worker: a Redis restart while jobs are being submitted used to kill it, 3 times out
  of 3 (kombu's `_connparams` reading `None.hostname` while closing the channel of a lost
  connection that still held late-acked messages; see `worker.celery_app._Channel`).
- `kq worker` exits non-zero when Celery's worker stops on its own (it used to exit 0).
- `kq up` starts its private redis-server again when it dies, and every child (worker,
  beat, receiver, simulator, API, dashboard, metrics) carries on with it.

Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from kombu import Connection, Consumer, Exchange, Queue

from kq.cli import worker_exit_code
from kq.procs import Proc, StackError, free_port
from kq.stack import Stack, StackConfig
from kq.supervisor import MAX_REVIVES
from tests.conftest import private_redis_server, wait_for
from tests.support import FAST_STACK_ENV
from worker import runtime
from worker.celery_app import REDIS_TRANSPORT, broker_transport_for, configure
from worker.domain import Job
from worker.producer import Producer
from worker.settings import Settings
from worker.store import JobStore

pytestmark = pytest.mark.integration

if shutil.which("redis-server") is None:
    if os.environ.get("CI"):
        pytest.fail("redis-server is required in CI", pytrace=False)
    pytest.skip("redis-server is not installed", allow_module_level=True)

IMAGE = "https://example.com/source.jpg"
API_TOKEN = "api-token-for-the-redis-restart-test"
OPS_TOKEN = "ops-token-for-the-redis-restart-test"
# Long enough that tasks running at the time fail on Redis and try to ack meanwhile.
OUTAGE_S = 2.0
OUTAGES = 3
# Four submit chunks: fewer late-acked tasks than the worker's 8 threads, so its
# consumer keeps a BRPOP outstanding meanwhile.
JOBS = 400
# kombu's Redis transport indexes each delivered, unacked message by delivery time here.
KOMBU_UNACKED_INDEX = "unacked_index"
# What Celery's consumer logs each time it has connected to the broker.
CONSUMER_CONNECTED = "Connected to "
# What the worker logs when a sweep that beat scheduled reaches it.
SWEEP_DONE = "Task kq.poll_due["
# Jobs whose submit message was stuck unacked get resent by the poller's queued check
# (60 s); ambiguous submits settle in seconds (STACK_ENV); the rest finish at once.
# Bounds a wait, never slept through.
SETTLE_S = 240.0


def sim_args(seed: int, *extra: str) -> tuple[str, ...]:
    return (
        *extra,
        "--seed", str(seed),
        "--inference-time", "0.2",
        # Tasks wait in the simulator's queue, so submits and results are spread out.
        "--queue-delay", "0.5",
        # The provider's own retry schedule (1, 2, 4 s) outlasts a Redis restart, as
        # WaveSpeed's does: deliveries answered 503 meanwhile arrive again afterwards.
        "--webhook-retry-base", "1.0",
        "--webhook-timeout", "2",
    )  # fmt: skip


STACK_ENV = {
    **FAST_STACK_ENV,
    "KQ_API_TOKEN": API_TOKEN,
    "KQ_OPS_TOKEN": OPS_TOKEN,
    # A submit whose answer was lost to the outage is reconciled within seconds, not the
    # production minutes (its task's webhooks may all have been answered 503).
    "KQ_AMBIGUOUS_GRACE_S": "5",
    "KQ_AMBIGUOUS_SETTLE_S": "10",
}


@contextlib.contextmanager
def running_stack(
    var_dir: Path, *, seed: int, concurrency: int = 4, sim_extra: tuple[str, ...] = ()
) -> Iterator[Stack]:
    config = StackConfig(
        var_dir=var_dir,
        sim_args=sim_args(seed, *sim_extra),
        worker_concurrency=concurrency,
        extra_env=STACK_ENV,
    )
    with Stack(config, announce=lambda line: None) as stack:
        yield stack


class Client:
    """The test's own view of the stack: settings, store, producer, HTTP."""

    def __init__(self, stack: Stack) -> None:
        self.settings = Settings.from_env({**os.environ, **stack.env})
        configure(self.settings)
        self.store: JobStore = runtime.make_store(self.settings)
        self.producer: Producer = runtime.make_producer(self.settings)
        self.http = httpx.Client(timeout=5, trust_env=False)
        self.receiver_url = stack.receiver_url or ""

    def close(self) -> None:
        self.http.close()
        self.store.redis.close()
        self.producer.close()

    def enqueue_batch(self, n: int) -> tuple[str, list[str]]:
        items = [{"prompt": f"restart {i}", "image": IMAGE, "seed": i} for i in range(n)]
        receipt = self.producer.enqueue_batch(items)
        return receipt.batch_id, self.store.batch_members(receipt.batch_id)

    def unsettled(self, job_ids: list[str]) -> list[Job | None]:
        jobs = self.store.get_many(job_ids)
        return [job for job in jobs if job is None or not job.terminal]

    def events_per_job(self) -> Counter[str]:
        return Counter(fields["job_id"] for _, fields in self.store.events())

    def receiver_ok(self) -> bool:
        try:
            return self.http.get(f"{self.receiver_url}/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def get_ok(self, url: str, token: str = "") -> bool:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            return self.http.get(url, headers=headers).status_code == 200
        except httpx.HTTPError:
            return False


@contextlib.contextmanager
def client_of(stack: Stack) -> Iterator[Client]:
    client = Client(stack)
    try:
        yield client
    finally:
        client.close()


def _redis_up(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1) as conn:
            return bool(conn.ping())
    except (redis.RedisError, OSError):
        return False


def _shutdown_redis(url: str) -> None:
    """`redis-cli -p PORT shutdown nosave`, as an operator would (redis-py if no redis-cli)."""
    port = str(redis.connection.parse_url(url)["port"])
    cli = shutil.which("redis-cli")
    if cli is not None:
        subprocess.run([cli, "-p", port, "shutdown", "nosave"], timeout=10, check=False)
        return
    with redis.Redis.from_url(url) as conn, contextlib.suppress(redis.ConnectionError):
        conn.shutdown(nosave=True)


def _alive_with(stack: Stack, pids: dict[str, int]) -> dict[str, str]:
    """Children that are not the same live process as before, with what became of them."""
    changed = {}
    for name, pid in pids.items():
        proc = stack.procs[name]
        if proc.pid != pid or not proc.alive:
            changed[name] = f"pid {pid} -> {proc.pid}, returncode {proc.returncode}"
    return changed


def _log_has(proc: Proc, text: str) -> bool:
    return text in proc.log_path.read_text(errors="replace")


def _has_after(path: Path, offset: int, text: str) -> bool:
    with path.open("rb") as log:
        log.seek(offset)
        return text in log.read().decode(errors="replace")


# --- the worker across a Redis restart during submits --------------------------------------


def _shutdown_redis_pubsub_first(url: str) -> None:
    """Shut Redis down, its pub/sub clients dropped a moment before the others.

    When Redis goes, the worker's consumer learns it from whichever of its sockets it
    reads first. The old kombu bug struck when that was the pub/sub one of Celery's
    control channel while the task channel had a BRPOP outstanding (fewer tasks running
    than the worker's concurrency) and a late-acked message unacked. Which socket comes
    first varies from run to run; dropping the pub/sub clients first makes it that one.
    """
    with redis.Redis.from_url(url) as conn, contextlib.suppress(redis.ConnectionError):
        pipe = conn.pipeline(transaction=False)
        pipe.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        pipe.execute_command("CLIENT", "KILL", "TYPE", "normal")  # all but this one
        pipe.execute_command("SHUTDOWN")  # AOF on: fsynced before it exits
        pipe.execute()


def test_worker_survives_redis_restarts_during_submits(tmp_path: Path) -> None:
    """Redis goes away for a few seconds, three times, while a batch is being submitted (as an
    external Redis restarting would: nobody restarts our processes), each time with a
    late-acked task unacked. The worker stays the same process, and every job still
    ends terminal with exactly one event."""
    # Some submits answered 5xx are retried as `kq.submit` with a countdown: such
    # messages wait in the worker unacked, as late-acked tasks in flight do.
    flaky = ("--submit-5xx-rate", "0.3")
    with (
        running_stack(tmp_path / "var", seed=31, concurrency=8, sim_extra=flaky) as stack,
        client_of(stack) as client,
    ):
        worker = stack.procs["worker"]
        redis_proc = stack.procs["redis"]
        pids = {name: proc.pid for name, proc in stack.procs.items() if name != "redis"}
        batch_id, job_ids = client.enqueue_batch(JOBS)

        def submits_under_way() -> bool:
            progress = client.producer.batch_progress(batch_id)
            return progress is not None and progress.total - progress.queued >= 20

        def consuming_with_task_unacked(connections: int, since: float) -> bool:
            # The consumer (re)connected, and has since been delivered a message it has
            # not acked yet (kombu's ack emulation indexes them by delivery time).
            connected = worker.log_path.read_text(errors="replace").count(CONSUMER_CONNECTED)
            if connected < connections:
                return False
            return bool(client.store.redis.zcount(KOMBU_UNACKED_INDEX, since, "+inf"))

        wait_for(submits_under_way, timeout_s=60, interval_s=0.02)
        since = 0.0
        for outage in range(1, OUTAGES + 1):
            ready = functools.partial(consuming_with_task_unacked, outage, since)
            wait_for(ready, timeout_s=60, interval_s=0.01)
            _shutdown_redis_pubsub_first(stack.redis_url)
            redis_proc.wait(10)
            stack.restart("redis", down_s=OUTAGE_S)  # start it again, same port and AOF
            since = time.time()
            client.store.redis.connection_pool.disconnect()
            assert _alive_with(stack, pids) == {}, worker.tail()
            wait_for(client.receiver_ok, timeout_s=30)

        def settled() -> bool:
            # A dead worker fails the test at once, with its last words.
            assert _alive_with(stack, pids) == {}, worker.tail()
            return not client.unsettled(job_ids)

        try:
            wait_for(settled, timeout_s=SETTLE_S, interval_s=0.5)
        except AssertionError:
            left = client.unsettled(job_ids)
            states = Counter(job.state.value if job else "missing" for job in left)
            raise AssertionError(f"{len(left)} jobs not settled: {dict(states)}") from None
        assert not _log_has(worker, "Unrecoverable error"), worker.tail()
        per_job = client.events_per_job()
        assert {job_id: per_job[job_id] for job_id in job_ids if per_job[job_id] != 1} == {}


# --- kq up: its private Redis dies; it is started again; everyone carries on ---------------


def _spawn_http(stack: Stack, name: str, command: list[str], health: str) -> str:
    port = free_port("127.0.0.1")
    url = f"http://127.0.0.1:{port}"

    def ready(_proc: Proc) -> bool:
        try:
            with httpx.Client(timeout=2, trust_env=False) as http:
                return http.get(url + health).status_code == 200
        except httpx.HTTPError:
            return False

    argv = [sys.executable, "-m", "kq.cli", *command, "--host", "127.0.0.1", "--port", str(port)]
    stack._spawn(name, argv, ready)
    return url


def test_kq_up_restarts_its_private_redis_and_every_process_carries_on(tmp_path: Path) -> None:
    """`redis-cli shutdown nosave` under a running stack: `wait_forever` (what `kq up`
    runs) starts Redis again on the same port with the same AOF; worker, beat, receiver,
    simulator, API, dashboard and metrics stay the same processes and work again."""
    with running_stack(tmp_path / "var", seed=32) as stack, client_of(stack) as client:
        api = _spawn_http(stack, "api", ["api", "--workers", "1", "--threads", "4"], "/healthz")
        dashboard = _spawn_http(stack, "dashboard", ["dashboard"], "/healthz")
        metrics = _spawn_http(stack, "metrics", ["metrics"], "/metrics")
        before = client.producer.enqueue({"prompt": "before", "image": IMAGE})
        wait_for(lambda: not client.unsettled([before]), timeout_s=60, interval_s=0.1)
        redis_proc = stack.procs["redis"]
        old_redis_pid = redis_proc.pid
        pids = {name: proc.pid for name, proc in stack.procs.items() if name != "redis"}

        watcher_error: list[BaseException] = []

        def watch() -> None:
            try:
                stack.wait_forever(poll_interval_s=0.1)
            except BaseException as exc:  # reported by the test below
                watcher_error.append(exc)

        watcher = threading.Thread(target=watch, name="kq-up-watcher", daemon=True)
        watcher.start()
        try:
            worker_log_size = stack.procs["worker"].log_path.stat().st_size
            _shutdown_redis(stack.redis_url)
            wait_for(lambda: redis_proc.pid != old_redis_pid, timeout_s=30, interval_s=0.1)
            wait_for(lambda: _redis_up(stack.redis_url), timeout_s=30, interval_s=0.1)
            assert watcher.is_alive(), watcher_error
            client.store.redis.connection_pool.disconnect()
            assert client.store.get(before) is not None  # replayed from the AOF

            # Every process is the same one, and does its job again.
            wait_for(client.receiver_ok, timeout_s=30)

            def api_accepts() -> str | None:
                try:
                    answer = client.http.post(
                        f"{api}/v1/jobs",
                        json={"prompt": "via api", "image": IMAGE},
                        headers={"Authorization": f"Bearer {API_TOKEN}"},
                    )
                except httpx.HTTPError:
                    return None
                return str(answer.json()["job_id"]) if answer.status_code == 201 else None

            via_api = wait_for(api_accepts, timeout_s=30, interval_s=0.2)
            after = client.producer.enqueue({"prompt": "after", "image": IMAGE})
            wait_for(lambda: not client.unsettled([via_api, after]), timeout_s=90, interval_s=0.2)
            wait_for(lambda: client.get_ok(f"{dashboard}/api/status", OPS_TOKEN), timeout_s=30)
            wait_for(lambda: client.get_ok(f"{metrics}/metrics"), timeout_s=30)
            # Beat: its heartbeat is written again, and its sweeps reach the worker again.
            beat_key = runtime.heartbeat_key("beat", stack.procs["beat"].pid)
            client.store.redis.delete(beat_key)
            wait_for(lambda: client.store.redis.exists(beat_key), timeout_s=30)
            worker_log = stack.procs["worker"].log_path
            wait_for(lambda: _has_after(worker_log, worker_log_size, SWEEP_DONE), timeout_s=30)
            assert _alive_with(stack, pids) == {}
            assert watcher.is_alive(), watcher_error
        finally:
            stack.stop()
            watcher.join(30)
        assert not watcher.is_alive()
        assert watcher_error == []


def test_private_redis_is_revived_a_bounded_number_of_times(tmp_path: Path) -> None:
    """Each death of the private Redis is answered by starting it again (same port, same
    AOF); one that keeps dying stops the stack like any other child would."""
    config = StackConfig(
        var_dir=tmp_path / "var",
        wavespeed_api_key="test-key",
        start_worker=False,
        start_beat=False,
        start_receiver=False,
        ready_timeout_s=10,
        stop_timeout_s=5,
    )
    messages: list[str] = []
    with Stack(config, announce=messages.append) as stack:
        url = stack.redis_url
        with redis.Redis.from_url(url) as conn:
            conn.set("kq:test:kept", "1")
        proc = stack.procs["redis"]
        for _ in range(MAX_REVIVES):
            pid = proc.pid
            stack.kill("redis", signal.SIGTERM)  # AOF fsynced on the way out
            wait_for(lambda: proc.poll() is not None, timeout_s=10)
            stack.check_children()
            assert proc.alive and proc.pid != pid
            assert stack.redis_url == url and _redis_up(url)
        with redis.Redis.from_url(url) as conn:
            assert conn.get("kq:test:kept") == b"1"
        stack.kill("redis", signal.SIGTERM)
        wait_for(lambda: proc.poll() is not None, timeout_s=10)
        with pytest.raises(StackError, match="redis exited unexpectedly"):
            stack.check_children()
    assert any(m.startswith("redis started again (pid") for m in messages)


def test_children_that_are_not_redis_still_stop_the_stack(tmp_path: Path) -> None:
    """Only the stack's own Redis is revived: a child of ours dying is a finding."""
    config = StackConfig(
        var_dir=tmp_path / "var",
        wavespeed_api_key="test-key",
        start_worker=False,
        start_beat=False,
        start_receiver=False,
        ready_timeout_s=10,
        stop_timeout_s=5,
    )
    with Stack(config, announce=lambda line: None) as stack:
        argv = [sys.executable, "-c", "import time; time.sleep(60)"]
        sleeper = stack._spawn("worker", argv, lambda _proc: True)
        stack.kill("worker")
        wait_for(lambda: sleeper.poll() is not None, timeout_s=10)
        with pytest.raises(StackError, match="worker exited unexpectedly"):
            stack.check_children()


# --- the kombu bug itself, on a bare connection ---------------------------------------------


def _half_closed_connection(redis_url: str, transport: str | None) -> tuple[Connection, object]:
    """What Celery's consumer holds after losing Redis, built with kombu's public API.

    The default channel consumes tasks (one delivered, not acked: a late-acked task still
    running); like Celery's pidbox, channels consume an auto-delete fanout queue. Redis
    goes away; `collect()`, as Celery calls it, fails to close the channels half-way and
    drops the transport's `client` anyway.
    """
    tag = uuid.uuid4().hex[:8]

    def broadcast(name: str) -> Queue:
        return Queue(name, Exchange(name, type="fanout"), auto_delete=True)

    conn = Connection(redis_url, transport=transport)
    work = Queue(f"kq.test.work.{tag}")
    with conn.Producer() as producer:
        producer.publish({"job": 1}, routing_key=work.name, declare=[work])
    got: list[object] = []
    Consumer(
        conn.default_channel,
        [work, broadcast(f"kq.test.a.{tag}")],
        callbacks=[lambda _body, message: got.append(message)],
    ).consume()
    Consumer(conn.channel(), [broadcast(f"kq.test.b.{tag}")]).consume()
    while not got:
        conn.drain_events(timeout=5)
    return conn, got[0]


@pytest.fixture
def doomed_redis(tmp_path: Path) -> Iterator[tuple[str, Callable[[], None]]]:
    with private_redis_server(tmp_path) as (url, proc):

        def kill() -> None:
            proc.terminate()
            proc.wait(10)

        yield url, kill


def test_a_channel_left_by_collect_fails_with_a_connection_error(
    doomed_redis: tuple[str, Callable[[], None]], caplog: pytest.LogCaptureFixture
) -> None:
    """With our transport, closing the half-closed connection and acking the message of
    a task that finished meanwhile (`Hub.close` -> `basic_ack`) are connection errors,
    which Celery already handles: no AttributeError reaches the worker."""
    url, kill = doomed_redis
    conn, message = _half_closed_connection(url, REDIS_TRANSPORT)
    errors = conn.connection_errors
    kill()
    conn.collect()
    conn.close()  # Celery: ignore_errors(connection, connection.close)
    with caplog.at_level(logging.CRITICAL, logger="kombu"):
        message.ack_log_error(logging.getLogger("kombu.test"), errors)  # type: ignore[attr-defined]
    assert "the broker connection of this channel is closed" in caplog.text


def test_stock_kombu_still_has_the_bug(doomed_redis: tuple[str, Callable[[], None]]) -> None:
    """The canary: the same sequence with kombu's own transport. When this fails, kombu
    fixed it and `worker.celery_app._Channel` can go."""
    url, kill = doomed_redis
    conn, _message = _half_closed_connection(url, None)
    kill()
    conn.collect()
    with pytest.raises(AttributeError, match="hostname"):
        conn.close()


def test_patched_transport_only_for_plain_redis_and_sentinel_urls() -> None:
    assert broker_transport_for("redis://127.0.0.1:6379/0") == REDIS_TRANSPORT
    assert broker_transport_for("rediss://cache.example:6380/0") is None
    # The Sentinel channel inherits the same bug (tests/test_sentinel.py shows it).
    sentinel = "worker.celery_app:SentinelTransport"
    assert broker_transport_for("sentinel://a:26379;sentinel://b:26379") == sentinel


# --- kq worker's exit code ------------------------------------------------------------------


class _Worker:
    def __init__(self, exitcode: int | None) -> None:
        self.exitcode = exitcode


@pytest.mark.parametrize(
    ("exitcode", "signal_name", "expected"),
    [
        (1, None, 1),  # "Unrecoverable error"
        (0, None, 1),  # stopped on its own without saying why: still a crash
        (None, None, 1),
        (0, "SIGTERM", 0),  # warm shutdown, as `kq up` and systemd stop it
        (1, "SIGINT", 0),  # Ctrl-C (Celery says EX_FAILURE; it was asked to stop)
        (1, "SIGQUIT", 1),  # cold shutdown
    ],
)
def test_worker_exit_code(exitcode: int | None, signal_name: str | None, expected: int) -> None:
    assert worker_exit_code(_Worker(exitcode), signal_name) == expected


# Runs `kq worker` with Celery's consumer made to fail the way an unexpected bug would.
CRASHING_WORKER = """
import sys
from celery.worker.consumer import consumer

def boom(self):
    raise RuntimeError("an unexpected bug in the consumer")

consumer.Consumer.start = boom
from kq.cli import main
sys.exit(main(["worker", "--concurrency", "1"]))
"""


def _worker_env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "KQ_REDIS_URL": redis_url,
        "WAVESPEED_API_KEY": "test-key-not-secret",
        "KQ_WAVESPEED_BASE_URL": "http://127.0.0.1:9",
        "KQ_SECRET_KEY": "test-secret-key-0123456789",
        "KQ_VAR_DIR": str(tmp_path),
        "KQ_LOG_FORMAT": "json",
    }


def test_crashed_worker_exits_non_zero(redis_url: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CRASHING_WORKER)],
        env=_worker_env(redis_url, tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "an unexpected bug in the consumer" in done.stdout + done.stderr
    assert done.returncode != 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_worker_stopped_by_sigterm_exits_zero(redis_url: str, tmp_path: Path) -> None:
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kq.cli", "worker", "--concurrency", "1"],
            env=_worker_env(redis_url, tmp_path),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        with redis.Redis.from_url(redis_url) as conn:
            beat_key = runtime.heartbeat_key("worker", proc.pid)
            wait_for(lambda: conn.exists(beat_key), timeout_s=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
