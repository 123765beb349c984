"""The adapters a use case needs, handed in by the entry point that calls it."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from worker import telemetry
from worker.admission import Admission
from worker.domain import JobState
from worker.settings import Settings
from worker.store import JobStore, TransitionResult
from worker.wavespeed import WaveSpeedClient

log = structlog.get_logger("kq.service")


@dataclass
class Deps:
    """The adapters a use case needs, built by the entry point that calls it."""

    store: JobStore
    provider: WaveSpeedClient
    settings: Settings
    clock: Callable[[], float] = field(default=time.time)
    # Puts a job id back on the submit queue (the Celery side hands this in).
    enqueue_submit: Callable[[str], None] = field(default=lambda job_id: None)
    # Account-wide limits shared through Redis; None: no admission control.
    admission: Admission | None = None
    # Where the use cases' counters go: None writes each at once; a long-running worker
    # hands in a started `telemetry.Buffered` so a submit pays no round trip for them.
    counter: telemetry.Buffered | None = None
    # Gives the calling thread its own adapters (see `on_this_thread`); None: one set for all.
    per_thread: Callable[[], Deps] | None = None

    def on_this_thread(self) -> Deps:
        """The adapters for the calling thread: these, or the thread's own copy where the
        entry point gives each thread one (a Redis connection of its own: see
        runtime.pinned_per_thread). A use case running on a pool thread asks once."""
        return self if self.per_thread is None else self.per_thread()

    def count(self, counts: Mapping[str, int]) -> None:
        """Add to telemetry counters (names of telemetry.NAMES); never raises."""
        if self.counter is None:
            telemetry.count_many(self.store.redis, counts)
        else:
            self.counter.count_many(counts)

    def transition(self, job_id: str, target: JobState, **kwargs: Any) -> TransitionResult:
        """`JobStore.transition`, then send the chain steps the move wrote (if any).

        Sending is best effort: a step written and not sent (no queue in this process,
        the broker away, a crash right here) is sent by the poller's check of queued
        jobs, which the same move scheduled (store.SPAWNED_CHECK_S).
        """
        result = self.store.transition(job_id, target, **kwargs)
        for spawned in result.spawned:
            try:
                self.enqueue_submit(spawned)
            except Exception as exc:  # any failure: the poller's check sends it
                log.warning("chain.step_send_deferred", job_id=spawned, error=repr(exc))
                break
        return result
