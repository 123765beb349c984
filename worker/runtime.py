"""Per-process wiring: build the adapters once from Settings and hand them out.

Entry points (`kq worker`, `kq beat`, `kq receiver`, producers) call `init` once;
Celery task bodies call `deps()`. Nothing here is imported by the domain.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import redis

from worker.admission import Admission
from worker.errors import ConfigError
from worker.producer import Producer
from worker.service import Deps
from worker.settings import Settings
from worker.store import JobStore
from worker.wavespeed import WaveSpeedClient

HEARTBEAT_TTL_S = 15
HEARTBEAT_EVERY_S = 5.0
HEARTBEATS_KEY = "kq:heartbeats"


def make_redis(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        health_check_interval=30,
        socket_connect_timeout=5,
        socket_timeout=10,
        retry_on_timeout=True,
    )


def make_store(settings: Settings, client: redis.Redis | None = None) -> JobStore:
    return JobStore(
        client or make_redis(settings),
        result_ttl_s=settings.result_ttl_s,
        events_maxlen=settings.events_maxlen,
    )


def make_provider(settings: Settings) -> WaveSpeedClient:
    return WaveSpeedClient(
        settings.wavespeed_base_url, settings.wavespeed_api_key, timeout_s=settings.http_timeout_s
    )


def make_producer(settings: Settings | None = None) -> Producer:
    """A Producer on these settings' Redis and Celery queue, with provider access for
    cancel's best-effort deletes."""
    from worker.celery_app import configure
    from worker.tasks import enqueue_submits

    settings = settings or Settings.from_env()
    configure(settings)
    store = make_store(settings)
    deps = Deps(store=store, provider=make_provider(settings), settings=settings)
    return Producer(store=store, send=enqueue_submits, deps=deps)


@dataclass
class _State:
    settings: Settings | None = None
    deps: Deps | None = None


_state = _State()
_lock = threading.Lock()


def init(settings: Settings) -> None:
    """Remember this process's settings; adapters are built on first use."""
    with _lock:
        _state.settings = settings
        _state.deps = None


def settings() -> Settings:
    if _state.settings is None:
        init(Settings.from_env())
    assert _state.settings is not None
    return _state.settings


def deps() -> Deps:
    """The process-wide adapters (thread-safe clients), built once."""
    if _state.deps is None:
        with _lock:
            if _state.deps is None:
                current = settings()
                current.require_provider()
                from worker.tasks import enqueue_submit  # the Celery side, wired in here

                store = make_store(current)
                _state.deps = Deps(
                    store=store,
                    provider=make_provider(current),
                    settings=current,
                    enqueue_submit=enqueue_submit,
                    admission=Admission(store.redis, current),
                )
    return _state.deps


def start_heartbeat(kind: str, client: redis.Redis) -> threading.Event:
    """Keep `kq:heartbeat:{kind}:{pid}` alive while this process runs; set the event to stop."""
    key = f"kq:heartbeat:{kind}:{os.getpid()}"
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            try:
                client.set(key, "1", ex=HEARTBEAT_TTL_S)
                # Indexed too (key -> expiry), so `kq status` finds them without a SCAN.
                client.zadd(HEARTBEATS_KEY, {key: time.time() + HEARTBEAT_TTL_S})
                client.zremrangebyscore(HEARTBEATS_KEY, "-inf", time.time() - 3600)
            except redis.RedisError:
                pass  # Redis is away; the key expiring is exactly the signal we want.
            stop.wait(HEARTBEAT_EVERY_S)
        try:
            client.delete(key)
            client.zrem(HEARTBEATS_KEY, key)
        except redis.RedisError:
            pass

    threading.Thread(target=beat, name=f"kq-heartbeat-{kind}", daemon=True).start()
    return stop


__all__ = ["ConfigError", "deps", "init", "make_redis", "make_store", "settings", "start_heartbeat"]
