"""Per-thread adapters (`Deps.on_this_thread`, `runtime.pinned_per_thread`): each pool
thread runs its Redis calls on a connection of its own, held between calls."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import redis

from worker.admission import Admission
from worker.runtime import pinned_per_thread
from worker.service import Deps
from worker.settings import Settings
from worker.store import JobStore
from worker.wavespeed import WaveSpeedClient


def _client_id(deps: Deps) -> int:
    return int(deps.store.redis.client_id())


def test_each_thread_keeps_its_own_connection(store: JobStore, settings: Settings) -> None:
    deps = Deps(
        store=store,
        provider=WaveSpeedClient("http://127.0.0.1:1", "key"),
        settings=settings,
        admission=Admission(store.redis, settings),
    )
    assert deps.on_this_thread() is deps  # no per-thread hook: one set for all
    deps.per_thread = pinned_per_thread(deps)
    barrier = threading.Barrier(4)

    def twice() -> tuple[int, int, bool]:
        own = deps.on_this_thread()
        first = _client_id(own)
        barrier.wait()  # all four threads hold their connection at once
        again = deps.on_this_thread()
        assert again is own and again.admission is not None
        return first, _client_id(again), again.admission.redis is own.store.redis

    with ThreadPoolExecutor(4) as pool:
        seen = list(pool.map(lambda _: twice(), range(4)))
    assert all(first == second and same for first, second, same in seen)  # held, shared
    assert len({first for first, _, _ in seen}) == 4  # one connection per thread
    own = deps.on_this_thread()
    assert own.store.result_ttl_s == store.result_ttl_s and own.settings is settings
    assert own.per_thread is None and isinstance(own.store.redis, redis.Redis)
