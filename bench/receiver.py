"""Receiver: genuine signed deliveries/s (and p99 latency) vs a bare Flask 204 view.

Ours: `kq receiver` under gunicorn, as the stack starts it. Every delivery is one that
WaveSpeed could send: a real job in Redis in state `submitted`, our per-job URL token,
a v3 signature made with the secret the receiver was given (KQ_WEBHOOK_SECRET), a
fresh timestamp and a unique webhook-id. So each one runs the whole path: verify,
dedupe, the atomic transition and the event append. Counting the events afterwards
checks that every accepted delivery was really applied.

Baseline: a Flask app defined here whose view answers 204 and does nothing else,
served by `worker.wsgi_server.serve` with the receiver's gunicorn settings (worker
class, workers, threads or connections, timeout, keep-alive), in its own process,
patched by gevent first as `kq receiver`'s is.

Floor (a reported row, no goal): the same bare view making one Redis PING before its
204, on a connection made and lent as the receiver makes and lends its own (fail-fast
timeouts, held by a client, at most `REDIS_CONNECTIONS` a process). A receiver that
applies a delivery durably makes at least that one round trip, so this is the most any
such receiver on this server could reach; the row shows how far ours is from it, and
the note how far the floor itself is from the bare 204.

Load: `bench.loadgen` (child processes, keep-alive connections, loopback only, each
request sent once, a deadline). Every server gets the same requests, after an uncounted
warm-up each, in rounds of half the requests taken in turn — bare, floor, ours, ours,
floor, bare — so that a drift in this shared machine's speed (±30 % within minutes
here) weighs on every side alike; each side's rate is its requests over its rounds' own
time, its latencies and CPU those of its rounds together. Idle servers wait in `accept`.
"""

from __future__ import annotations

import base64
import json
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import urlencode

import httpx
import redis
from flask import Flask, Response

from bench.common import (
    REPO_ROOT,
    Row,
    bench_stack,
    cpu_snapshot,
    process_tree,
    stack_settings,
)
from bench.loadgen import LoadResult, Request, blast, merge
from kq.procs import Proc, free_port
from kq.stack import Stack
from webhook_receiver.app import REDIS_CONNECTIONS
from webhook_receiver.server import (
    DEFAULT_CONNECTIONS,
    DEFAULT_THREADS,
    DEFAULT_TIMEOUT_S,
    DEFAULT_WORKER_CLASS,
    DEFAULT_WORKERS,
)
from worker import keys
from worker.domain import MODEL, EditRequest, JobState
from worker.lender import Lender
from worker.producer import Item, Producer
from worker.runtime import make_redis, make_store, pinned_client
from worker.settings import Settings
from worker.signing import WEBHOOK_PATH, job_token, sign_v3
from worker.store import JobStore

GOAL_RATIO = 0.7
P99_GOAL = 1.5
LOAD_PROCESSES = 2
THREADS_PER_PROCESS = 8


def run(*, quick: bool) -> list[Row]:
    n = 400 if quick else 12_000
    warm = 40 if quick else 200
    deadline_s = 20.0 if quick else 60.0
    with receiver_and_bare(warm + n, floor=True) as (stack, store, urls, sign):
        assert stack.receiver_url is not None
        deliveries = sign()  # the rounds take seconds: well inside the ±300 s window
        load = partial(_load, deadline_s=deadline_s)
        for url in (*urls.values(), stack.receiver_url):
            load(url, deliveries[:warm])  # warm-ups, not counted
        sides = in_rounds(stack, urls, deliveries[warm:], load, RECEIVER_ROUNDS)
        base, floor, ours = sides["bare"], sides["floor"], sides["ours"]
        applied = int(store.redis.xlen(keys.EVENTS)) - warm
    refused = {s: c for s, c in ours.answers.statuses.items() if not 200 <= s < 300}
    note = f"{applied:,} of {len(ours.answers.latencies):,} deliveries applied (an event each)"
    if refused:
        note += f"; refused: {refused}"
    ours_cpu, base_cpu = ours.cpu_ms_per_request(), base.cpu_ms_per_request()
    floor_cpu = floor.cpu_ms_per_request()
    return [
        Row.higher_is_better(
            "receiver",
            "signed deliveries/s vs bare Flask 204",
            ours.rate,
            base.rate,
            "req/s",
            GOAL_RATIO,
            note=note,
        ),
        Row.reported(
            "receiver",
            "signed deliveries/s vs bare Flask 204 + one Redis PING (the floor)",
            ours.rate,
            floor.rate,
            "req/s",
            note=f"the floor itself: {floor.rate:,.0f} req/s, "
            f"{floor.rate / max(base.rate, 1e-9):.2f}x of the bare 204's",
        ),
        Row.lower_is_better(
            "receiver",
            "p99 latency vs bare Flask 204 p99",
            ours.answers.percentile_ms(0.99),
            base.answers.percentile_ms(0.99),
            "ms",
            P99_GOAL,
            note=f"{LOAD_PROCESSES * THREADS_PER_PROCESS} connections, keep-alive",
        ),
        Row.reported(
            "receiver",
            "CPU per delivery (receiver + Redis) vs bare Flask 204",
            ours_cpu["server"] + ours_cpu["redis"],
            base_cpu["server"],
            "ms",
            note=f"receiver {ours_cpu['server']:.3f} ms, Redis {ours_cpu['redis']:.3f} ms; "
            f"the floor {floor_cpu['server']:.3f} ms, Redis {floor_cpu['redis']:.3f} ms",
        ),
    ]


# The order of the rounds: a steady drift in the machine's speed costs every side alike.
ROUNDS = ("bare", "ours", "ours", "bare")
RECEIVER_ROUNDS = ("bare", "floor", "ours", "ours", "floor", "bare")


@dataclass
class Side:
    """One server's rounds together."""

    runs: list[LoadResult] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def answers(self) -> LoadResult:
        return merge(self.runs)

    @property
    def rate(self) -> float:
        """Accepted requests per second of the rounds' own time (not the gaps between)."""
        seconds = sum(run.finished - run.started for run in self.runs)
        return sum(run.accepted for run in self.runs) / max(seconds, 1e-9)

    def cpu_ms_per_request(self) -> dict[str, float]:
        requests = sum(len(run.latencies) for run in self.runs)
        return {group: s * 1000 / max(requests, 1) for group, s in self.cpu_s.items()}


def in_rounds(
    stack: Stack,
    urls: dict[str, str],
    deliveries: list[Request],
    load: Callable[[str, list[Request]], LoadResult],
    rounds: tuple[str, ...] = ROUNDS,
) -> dict[str, Side]:
    """Send `deliveries` to each server in `rounds` (each side's rounds share them out: a
    delivery reaches our receiver once); each side's answers, and CPU per process group
    ("server", and "redis" for the sides that call it)."""
    assert stack.receiver_url is not None
    urls = {**urls, "ours": stack.receiver_url}
    redis_pid = [stack.procs["redis"].pid]
    groups = {
        name: {"server": process_tree(stack.procs[_PROCS[name]].pid)}
        | ({"redis": redis_pid} if name != "bare" else {})
        for name in urls
    }
    sides = {name: Side() for name in urls}
    per_side = {name: rounds.count(name) for name in urls}
    for name in rounds:
        side = sides[name]
        k, count = len(side.runs), per_side[name]
        share = deliveries[k * len(deliveries) // count : (k + 1) * len(deliveries) // count]
        before = cpu_snapshot(groups[name])
        side.runs.append(load(urls[name], share))
        after = cpu_snapshot(groups[name])
        for group in groups[name]:
            side.cpu_s[group] = side.cpu_s.get(group, 0.0) + after[group] - before[group]
    return sides


# The stack's process serving each side.
_PROCS = {"bare": "bare-flask", "floor": "bare-flask-redis", "ours": "receiver"}


@contextmanager
def receiver_and_bare(
    n: int, *, floor: bool = False
) -> Iterator[tuple[Stack, JobStore, dict[str, str], Callable[[], list[Request]]]]:
    """A stack with the receiver (no worker), `n` jobs waiting for their result, the bare
    Flask server beside it (and with `floor`, the bare one making a Redis PING): (stack,
    store, the baselines' URLs by side name, a function that signs one fresh delivery per
    job — sign again before each side, timestamps must be fresh)."""
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    with bench_stack(
        extra_env={"KQ_WEBHOOK_SECRET": secret}, start_worker=False, start_beat=False
    ) as stack:
        settings = stack_settings(stack)
        store = make_store(settings)
        try:
            jobs = _prepare(store, n)
            urls = {"bare": _start_bare(stack)}
            if floor:
                urls["floor"] = _start_bare(stack, ping_redis=True)
            yield stack, store, urls, partial(_sign, jobs, settings.secret_key, secret)
        finally:
            store.redis.close()


def _prepare(store: JobStore, n: int) -> list[tuple[str, str]]:
    """`n` jobs in state `submitted`, as if a worker had submitted them: (job, prediction)."""
    items = [
        Item(EditRequest(prompt=f"receiver edit {i}", image="https://example.com/a.jpg"))
        for i in range(n)
    ]
    # No Celery message: no worker runs here, the jobs only need to exist.
    Producer(store=store, send=lambda ids: None).enqueue_batch(items, batch_id="bench-receiver")
    jobs = []
    for item in items:
        prediction_id = secrets.token_hex(16)
        now = time.time()
        store.transition(item.job_id, JobState.SUBMITTING, now=now)
        store.transition(
            item.job_id,
            JobState.SUBMITTED,
            now=now,
            fields={"prediction_id": prediction_id, "submitted_at": now},
            expect_prediction_id=prediction_id,
        )
        jobs.append((item.job_id, prediction_id))
    return jobs


def _sign(jobs: list[tuple[str, str]], secret_key: str, webhook_secret: str) -> list[Request]:
    """One genuine completion delivery per job, timestamped and signed now."""
    return [_delivery(job_id, pid, secret_key, webhook_secret) for job_id, pid in jobs]


def _delivery(job_id: str, prediction_id: str, secret_key: str, webhook_secret: str) -> Request:
    """The webhook WaveSpeed sends when a task completes (shape as the simulator's)."""
    body = json.dumps(
        {
            "id": prediction_id,
            "model": MODEL,
            "outputs": [f"https://cdn.example.com/outputs/{prediction_id}.jpeg"],
            "urls": {"get": f"https://api.example.com/api/v3/predictions/{prediction_id}/result"},
            "has_nsfw_contents": [False],
            "status": "completed",
            "created_at": "2026-01-01T00:00:00.000000000Z",
            "error": "",
            "executionTime": 2000,
            "timings": {"inference": 2000},
        },
        separators=(",", ":"),
    ).encode()
    webhook_id = secrets.token_hex(16)
    timestamp = str(int(time.time()))
    query = urlencode({"job": job_id, "t": job_token(secret_key, job_id)})
    headers = {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": timestamp,
        "webhook-signature": sign_v3(webhook_secret, webhook_id, timestamp, body),
    }
    return Request(f"{WEBHOOK_PATH}?{query}", headers, body)


# --- the baseline server -------------------------------------------------------------


def bare_app(ping_redis: bool = False) -> Flask:
    """The least a Flask view can do for a webhook: answer 204 (after one Redis PING, with
    `ping_redis`, on a connection lent as the receiver lends its own)."""
    app = Flask("bench_bare")
    connections = _redis_connections() if ping_redis else None

    @app.post(WEBHOOK_PATH)
    def webhook() -> Response:
        if connections is not None:
            with connections.lend() as client:
                client.ping()
        return Response(status=204)

    @app.get("/healthz")
    def healthz() -> Response:
        return Response(status=204)

    return app


def _redis_connections() -> Lender[redis.Redis]:
    """The stack's Redis (from this process's environment): clients holding one
    connection each, made and lent as the receiver makes and lends its own."""
    shared = make_redis(Settings.from_env(), fail_fast=True)
    return Lender(partial(pinned_client, shared), REDIS_CONNECTIONS)


def serve_bare(port: int, ping_redis: bool = False) -> None:
    """Serve `bare_app` on 127.0.0.1 with the receiver's gunicorn settings (blocks)."""
    from worker.wsgi_server import serve

    serve(
        partial(bare_app, ping_redis),
        host="127.0.0.1",
        port=port,
        workers=DEFAULT_WORKERS,
        threads=DEFAULT_THREADS,
        timeout_s=DEFAULT_TIMEOUT_S,
        worker_class=DEFAULT_WORKER_CLASS,
        connections=DEFAULT_CONNECTIONS,
    )


def _start_bare(stack: Stack, *, ping_redis: bool = False) -> str:
    port = free_port("127.0.0.1")
    # As `kq receiver` does (kq.gevent_main): gevent patches before anything else runs.
    patch = "from gevent import monkey; monkey.patch_all(); "
    code = (
        (patch if DEFAULT_WORKER_CLASS == "gevent" else "")
        + f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); "
        f"from bench.receiver import serve_bare; serve_bare({port}, {ping_redis!r})"
    )
    url = f"http://127.0.0.1:{port}"

    def ready(_proc: Proc) -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=1.0, trust_env=False).status_code == 204
        except httpx.HTTPError:
            return False

    stack._spawn(_PROCS["floor" if ping_redis else "bare"], [sys.executable, "-c", code], ready)
    return url


def _load(base_url: str, deliveries: list[Request], *, deadline_s: float) -> LoadResult:
    return blast(
        base_url,
        deliveries,
        processes=LOAD_PROCESSES,
        threads=THREADS_PER_PROCESS,
        deadline_s=deadline_s,
    )
