"""A worker's graceful stop: hand back what it has not started, bound what it has.

On SIGTERM Celery stops consuming and waits for the tasks running. A `kq.submit_chunk`
running then has queued its jobs on the submit pool; with the provider hanging, every
pool thread waits on a POST and the chunk would go on starting its remaining submits
for as long as that lasts. `Drain.begin` cancels the submits that have not started (each
job is still `queued` in Redis) and hands them back to the queue at once, for another
worker, and arms a timer: a worker still here after KQ_DRAIN_TIMEOUT_S leaves anyway.
What it cuts off is safe: each submit still running was recorded `submitting` before
its POST, so it is settled as an ambiguous submit, never paid twice.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

import structlog

log = structlog.get_logger("kq.drain")


class Drain:
    """The submits a worker's chunks have queued but not finished, and the drain flag."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[Future[Any], str] = {}
        self._draining = threading.Event()
        self._hand_back: Callable[[list[str]], None] = lambda job_ids: None

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def track(self, submits: Iterable[tuple[Future[Any], str]]) -> None:
        """Remember a chunk's submits (future, job id) until `forget`; while draining,
        the ones not started yet are handed back at once."""
        with self._lock:
            self._pending.update(submits)
        if self.draining:
            self._cancel_unstarted()

    def forget(self, futures: Iterable[Future[Any]]) -> None:
        with self._lock:
            for future in futures:
                self._pending.pop(future, None)

    def begin(
        self,
        hand_back: Callable[[list[str]], None],
        timeout_s: float,
        on_timeout: Callable[[], None],
    ) -> threading.Timer:
        """Start draining: cancel and hand back the unstarted submits (in a thread: this
        runs in a signal handler), and call `on_timeout` if still here `timeout_s` later."""
        self._hand_back = hand_back
        self._draining.set()
        threading.Thread(target=self._cancel_unstarted, name="kq-drain", daemon=True).start()
        timer = threading.Timer(timeout_s, on_timeout)
        timer.daemon = True
        timer.start()
        return timer

    def _cancel_unstarted(self) -> None:
        with self._lock:
            items = list(self._pending.items())
        back = [job_id for future, job_id in items if future.cancel()]
        if back:
            log.info("worker.drain_handed_back", jobs=len(back))
            self._hand_back(back)
