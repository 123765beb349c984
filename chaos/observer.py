"""Watching the stack from outside while it runs: job states and the event stream.

`Observer` runs two threads against the stack's Redis, the way a monitor and a
downstream consumer would:

- a sampler reads the pushed jobs' (state, version) twice a second and records any move
  backwards: a version that went down, one version with two states, a terminal job
  that changed afterwards (after a Redis restart from its AOF, say). The one backward
  edge the table allows (submitting -> queued, a submit retry) bumps the version too;
- a reader follows `kq:events` with XREAD, as a consumer does, so every event is seen
  even when the stream is capped and old entries are trimmed (the soak run).

Both ride out Redis being away (restart) and pick up where they left off.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from worker import keys
from worker.domain import TERMINAL_STATES

SAMPLE_EVERY_S = 0.5
# Terminal jobs are re-read a slice per round (they must never change again); the others
# every round.
TERMINAL_SLICE = 250
READ_BLOCK_MS = 500
READ_COUNT = 1000
_TERMINAL = frozenset(s.value for s in TERMINAL_STATES)


@dataclass
class Observations:
    """What the observer saw; read it after `Observer.stop()`."""

    samples: int = 0
    redis_errors: int = 0
    backward: list[str] = field(default_factory=list)
    events: dict[str, list[dict[str, str]]] = field(default_factory=lambda: defaultdict(list))
    # Chain events by chain id, and outputs events by job id (the stream's other types).
    chain_events: dict[str, list[dict[str, str]]] = field(default_factory=lambda: defaultdict(list))
    outputs_events: dict[str, list[dict[str, str]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    last_seen: dict[str, tuple[str, int]] = field(default_factory=dict)


class Observer:
    """Samples job states and follows the event stream until stopped."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._ids: list[str] = []
        self._rotate = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.seen = Observations()
        self._threads = [
            threading.Thread(target=self._sample_loop, name="chaos-sampler", daemon=True),
            threading.Thread(target=self._read_loop, name="chaos-events", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> Observations:
        """Stop after a last full sample and a last read of the stream."""
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        self._sample(everything=True)
        while self._read(block_ms=None):
            pass
        return self.seen

    def watch(self, job_ids: Sequence[str]) -> None:
        with self._lock:
            self._ids.extend(job_ids)

    def in_submit_now(self) -> list[str]:
        """The watched jobs in `submitting` right now and not yet flagged ambiguous: the
        ones a worker is (or was, if it just died) posting."""
        with self._lock:
            ids = list(self._ids)
        pipe = self._redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(keys.job(job_id), "state", "ambiguous")
        rows: list[Any] = pipe.execute()
        return [
            j
            for j, (state, ambiguous) in zip(ids, rows, strict=True)
            if state == "submitting" and ambiguous != "1"
        ]

    # --- sampling -------------------------------------------------------------------------

    def _sample_loop(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            try:
                self._sample()
            except (redis.RedisError, OSError):
                self.seen.redis_errors += 1

    def _sample(self, everything: bool = False) -> None:
        with self._lock:
            ids = list(self._ids)
        if not everything:
            last = self.seen.last_seen
            done = [j for j in ids if j in last and last[j][0] in _TERMINAL]
            ids = [j for j in ids if not (j in last and last[j][0] in _TERMINAL)]
            if done:
                start = self._rotate % len(done)
                ids += (done[start:] + done[:start])[:TERMINAL_SLICE]
                self._rotate = start + TERMINAL_SLICE
        pipe = self._redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(keys.job(job_id), "state", "version")
        rows: list[Any] = pipe.execute()
        self.seen.samples += 1
        for job_id, (state, version) in zip(ids, rows, strict=True):
            if state is None:
                continue  # not written yet, or expired after its TTL (terminal)
            self._check(job_id, str(state), int(version or 0))

    def _check(self, job_id: str, state: str, version: int) -> None:
        before = self.seen.last_seen.get(job_id)
        self.seen.last_seen[job_id] = (state, version)
        if before is None or before == (state, version):
            return
        old_state, old_version = before
        if version < old_version:
            problem = "version went down"
        elif version == old_version:
            problem = "one version, two states"
        elif old_state in _TERMINAL:
            problem = "a terminal job moved on"
        else:  # a forward move, or the retry edge submitting -> queued (the table allows it)
            return
        self.seen.backward.append(
            f"{job_id}: {old_state} v{old_version} -> {state} v{version} ({problem})"
        )

    # --- the event stream -----------------------------------------------------------------

    _last_id = "0-0"

    def _read_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._read(block_ms=READ_BLOCK_MS)
            except (redis.RedisError, OSError):
                self.seen.redis_errors += 1
                self._stop.wait(0.5)

    def _read(self, block_ms: int | None) -> int:
        answer: Any = self._redis.xread(
            {keys.EVENTS: self._last_id}, count=READ_COUNT, block=block_ms
        )
        entries = answer[0][1] if answer else []
        for entry_id, fields in entries:
            self._last_id = str(entry_id)
            event = {str(k): str(v) for k, v in fields.items()}
            kind = event.get("type", "job")
            if kind == "chain":
                self.seen.chain_events[event.get("chain_id", "")].append(event)
            elif kind == "outputs":
                self.seen.outputs_events[event.get("job_id", "")].append(event)
            else:
                self.seen.events[event.get("job_id", "")].append(event)
        return len(entries)
