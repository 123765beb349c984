"""Per-process wiring: build the adapters from Settings for an entry point to hand in.

Entry points (`kq worker`, `kq beat`, `kq receiver`, `kq api`, producers) build their
Settings once and call these; the Celery tasks get theirs through `tasks.install`.
Nothing here reads the environment, and nothing below the entry points imports it.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from worker import keys
from worker.admission import Admission
from worker.celery_app import configure
from worker.producer import Producer
from worker.service import Deps
from worker.settings import Settings
from worker.store import JobStore
from worker.tasks import enqueue_submits
from worker.wavespeed import WaveSpeedClient

HEARTBEAT_TTL_S = 15
# The receiver answers within the provider's 5 s webhook timeout even when Redis stalls.
FAIL_FAST_TIMEOUT_S = 0.75
HEARTBEAT_EVERY_S = 5.0


def make_redis(settings: Settings, *, fail_fast: bool = False) -> redis.Redis:
    """A client for the job store. `fail_fast` (the receiver): short timeouts, so a stalled
    Redis gives a prompt error (a 503 the provider retries) instead of holding the request
    past the provider's own timeout. Its one retry is for a connection found broken (a
    Redis restart, an idle timeout): an instant reconnect, as a pool's check of a
    connection before use would do (a pinned connection is not checked: pinned_client).

    With KQ_REDIS_SENTINELS the client asks the Sentinels for the primary whenever it
    connects, and drops a connection whose server turned into a replica (redis-py answers
    READONLY with a ConnectionError and reconnects), so it follows a failover by itself.
    """
    if fail_fast:
        options: dict[str, Any] = {
            "socket_connect_timeout": FAIL_FAST_TIMEOUT_S,
            "socket_timeout": FAIL_FAST_TIMEOUT_S,
            "retry": Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        }
    else:
        options = {"socket_connect_timeout": 5, "socket_timeout": 10, "retry_on_timeout": True}
    if settings.redis_sentinels:
        return _sentinel_master(settings, options)
    return redis.Redis.from_url(
        settings.redis_url, decode_responses=True, health_check_interval=30, **options
    )


def pinned_client(client: redis.Redis) -> redis.Redis:
    """A client that holds one connection of `client`'s pool for its whole life, for a
    thread that makes many calls: each call then skips the pool's check-out (a lock, and a
    poll of the socket for unread data) and check-in. Same server, options and timeouts
    (they live in the pool); a broken connection is reconnected as usual. Dropped, it
    gives its connection back to the pool.

    Not with Sentinels: after a failover redis-py moves a pool's idle connections to the
    new primary, never one held like this, which stays on the demoted server (its reads
    answered by a replica) until a write fails there."""
    return redis.Redis(connection_pool=client.connection_pool, single_connection_client=True)


def pinned_per_thread(deps: Deps) -> Callable[[], Deps]:
    """For `Deps.per_thread`: each calling thread gets a copy of `deps` whose store and
    admission run on a connection of the thread's own (pinned_client), made on its first
    call. For pools of long-lived threads (gunicorn's, the submit and poll pools)."""
    local = threading.local()

    def this_thread() -> Deps:
        own: Deps | None = getattr(local, "deps", None)
        if own is None:
            own = local.deps = pinned_copy(deps)
        return own

    return this_thread


def pinned_copy(deps: Deps) -> Deps:
    """A copy of `deps` whose store and admission run on a connection of its own
    (pinned_client), for one caller at a time."""
    client = pinned_client(deps.store.redis)
    admission = deps.admission and deps.admission.on_client(client)
    store = deps.store.on_client(client)
    return replace(deps, store=store, admission=admission, per_thread=None)


def _sentinel_master(settings: Settings, options: dict[str, Any]) -> redis.Redis:
    """A client of the Sentinel-managed primary; KQ_REDIS_URL lends its database number,
    username and password (the Sentinels themselves are asked without a password)."""
    url = settings.redis_url or "redis:///0"
    parsed = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
    auth = {k: parsed[k] for k in ("username", "password", "db") if parsed.get(k) is not None}
    # A Sentinel that does not answer within this long is skipped for the next one.
    timeout = options["socket_connect_timeout"]
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(settings.redis_sentinels),
        sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout},
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        settings.redis_master_name,
        redis_class=redis.Redis,
        decode_responses=True,
        health_check_interval=30,
        **auth,
        **options,
    )
    return client


def make_store(settings: Settings, client: redis.Redis | None = None) -> JobStore:
    return JobStore(
        client or make_redis(settings),
        result_ttl_s=settings.result_ttl_s,
        events_maxlen=settings.events_maxlen,
        keep_outputs=settings.keep_outputs,  # KQ_OUTPUTS: completed jobs are copied out
    )


def make_provider(settings: Settings) -> WaveSpeedClient:
    return WaveSpeedClient(
        settings.wavespeed_base_url, settings.wavespeed_api_key, timeout_s=settings.http_timeout_s
    )


def make_deps(settings: Settings, enqueue_submit: Callable[[str], None]) -> Deps:
    """The adapters a worker or beat process hands to the use cases."""
    settings.require_provider()
    store = make_store(settings)
    deps = Deps(
        store=store,
        provider=make_provider(settings),
        settings=settings,
        enqueue_submit=enqueue_submit,
        admission=Admission(store.redis, settings),
    )
    if not settings.redis_sentinels:  # see pinned_client
        deps.per_thread = pinned_per_thread(deps)
    return deps


def make_producer(settings: Settings) -> Producer:
    """A Producer on these settings' Redis and Celery queue, with provider access for
    cancel's best-effort deletes; `close()` it (or use it in a `with`) when done."""
    configure(settings)
    store = make_store(settings)
    provider = make_provider(settings)
    deps = Deps(store=store, provider=provider, settings=settings)
    return Producer(
        store=store,
        send=enqueue_submits,
        deps=deps,
        closers=(provider.close, partial(close_redis, store.redis)),
    )


def close_redis(client: redis.Redis) -> None:
    """Close a client of `make_redis`: its pool's connections, and for a Sentinel-managed
    one its connections to the Sentinels too (the Sentinel manager `_sentinel_master`
    made lives on in the pool, which `close()` does not close)."""
    client.close()
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    if manager is not None and hasattr(manager, "close"):  # not in every redis-py allowed
        manager.close()


def heartbeat_key(kind: str, pid: int) -> str:
    """This host's heartbeat key of process `pid` (what `start_heartbeat` keeps alive there)."""
    return keys.heartbeat(kind, socket.gethostname(), pid)


def start_heartbeat(kind: str, client: redis.Redis) -> threading.Event:
    """Keep `kq:heartbeat:{kind}:{host}:{pid}` alive while this process runs; set the event
    to stop."""
    key = heartbeat_key(kind, os.getpid())
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            try:
                client.set(key, "1", ex=HEARTBEAT_TTL_S)
                # Indexed too (key -> expiry), so `kq status` finds them without a SCAN.
                client.zadd(keys.HEARTBEATS, {key: time.time() + HEARTBEAT_TTL_S})
                client.zremrangebyscore(keys.HEARTBEATS, "-inf", time.time() - 3600)
            except redis.RedisError:
                pass  # Redis is away; the key expiring is exactly the signal we want.
            stop.wait(HEARTBEAT_EVERY_S)
        try:
            client.delete(key)
            client.zrem(keys.HEARTBEATS, key)
        except redis.RedisError:
            pass

    threading.Thread(target=beat, name=f"kq-heartbeat-{kind}", daemon=True).start()
    return stop


__all__ = [
    "heartbeat_key",
    "make_deps",
    "make_producer",
    "make_provider",
    "make_redis",
    "make_store",
    "start_heartbeat",
]
