"""Cheap operational counters in Redis, for `kq status`, `kq metrics` and the dashboard.

The job store answers "where is each job"; this module answers "what happened lately"
(submit retries, 429s, webhook outcomes, polls). Every `count` call is one pipelined
round trip that bumps the same names in three hashes:

    kq:tm:{minute}      per-minute bucket (minute = unix time // 60), expires after
                        BUCKET_TTL_S: "in the last N minutes" sums these
    kq:tm:day:{date}    per-UTC-day bucket, expires after DAY_TTL_S: "today"
    kq:tm:total         monotonic totals since the Redis was new: Prometheus counters

Counting is best effort and must never hurt the caller: a Redis error (or anything
else) is swallowed, because losing a counter is better than failing a webhook or a
submit. Names are a small fixed vocabulary (see NAMES) so metric labels stay bounded.

A process on a hot path (the receiver, a worker's submits) keeps its counts in a
`Buffered` sink instead: summed in memory and written by a background thread in one
pipelined round trip every FLUSH_EVERY_S, so a delivery or a submit pays no round trip
of its own for them (at most that long of counts is lost if the process dies hard; a
normal exit writes them).
"""

from __future__ import annotations

import atexit
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

import redis

from worker import keys

# Two hours of minute buckets: status windows are minutes, the dashboard chart one hour.
BUCKET_TTL_S: Final = 2 * 3600
# "Cost today" needs only today; a week keeps yesterday's numbers for a look back.
DAY_TTL_S: Final = 8 * 24 * 3600

# The vocabulary. Callers may only count these (unknown names are dropped), so a typo
# or a job id can never turn into an unbounded label.
SUBMIT_OUTCOMES: Final = (
    "submitted",  # the provider accepted a submit: one paid task
    "retry",  # transient error; the task is retried with backoff
    "rate_limited",  # the retry was an HTTP 429 (also counted as retry)
    "ambiguous",  # the answer was lost; reconciliation decides
    "rejected",  # 4xx: the job failed
    "exhausted",  # retries used up: the job failed
    "unreplicated",  # no replica confirmed the `submitting` record: put back, not sent
)
WEBHOOK_OUTCOMES: Final = (
    "applied",
    "duplicate",
    "stale",
    "not_final",
    "unknown_job",
    "bad_signature",
    "bad_token",
    "malformed",
    "too_large",
    "timeout",  # the body did not arrive in time (408)
    "unavailable",
    "verifying",  # a reported failure, left for the provider's GET to confirm
)
POLL_OUTCOMES: Final = (
    "pending",
    "resolved_applied",
    "resolved_rejected",
    "resolved_conflict",
    "resolved_mismatch",
    "resolved_missing",
    "already_terminal",
    "not_pollable",
    "submit_in_progress",
    "deadline",
    "provider_error",
    "adopted_applied",
    "adopted_rejected",
    "adopted_conflict",
    "adopted_mismatch",
    "adopted_missing",
    "requeued",
    "ambiguous_waiting",
    "ambiguous_failed",
    "queued_waiting",
    "resent",
    "resend_failed",
    "task_not_found",
    *(
        f"{what}_{outcome}"
        for what in ("requeued", "stuck_submit")
        for outcome in ("applied", "rejected", "conflict", "mismatch", "missing")
    ),
)
COST_SUBMITTED_MICROS: Final = "cost.submitted_micros"
NAMES: Final = frozenset(
    [f"submit.{n}" for n in SUBMIT_OUTCOMES]
    + [f"webhook.{n}" for n in WEBHOOK_OUTCOMES]
    + [f"poll.{n}" for n in POLL_OUTCOMES]
    # Not an outcome: micro-dollars of the tasks counted in submit.submitted, each at its
    # own model's price (worker.models), for the cost today and in total.
    + [COST_SUBMITTED_MICROS]
)


def minute_key(minute: int) -> str:
    return f"{keys.TELEMETRY_PREFIX}{minute}"


def day_key(ts: float) -> str:
    return f"{keys.TELEMETRY_PREFIX}day:{datetime.fromtimestamp(ts, UTC):%Y%m%d}"


def count(client: redis.Redis, name: str, n: int = 1, *, now: float | None = None) -> None:
    """Add `n` to counter `name` (one of NAMES); never raises."""
    count_many(client, {name: n}, now=now)


def count_many(client: redis.Redis, counts: Mapping[str, int], *, now: float | None = None) -> None:
    """Add several counters in one round trip; unknown names and zeros are skipped."""
    try:
        pipe = client.pipeline(transaction=False)
        if _queue_counts(pipe, counts, time.time() if now is None else now):
            pipe.execute()
    except Exception:  # noqa: S110 - telemetry must never fail the work it describes
        pass


def _queue_counts(pipe: Any, counts: Mapping[str, int], ts: float) -> bool:
    """Queue the increments of `counts` on `pipe`; False when there is nothing to count."""
    items = [(k, int(v)) for k, v in counts.items() if k in NAMES and int(v)]
    if not items:
        return False
    minute, day = minute_key(int(ts // 60)), day_key(ts)
    for name, value in items:
        pipe.hincrby(minute, name, value)
        pipe.hincrby(day, name, value)
        pipe.hincrby(keys.TELEMETRY_TOTAL, name, value)
    pipe.expire(minute, BUCKET_TTL_S)
    pipe.expire(day, DAY_TTL_S)
    return True


# How often a Buffered sink writes what it has summed (a counter is that late at most).
FLUSH_EVERY_S: Final = 0.25


class Buffered:
    """Counters and raw hash increments summed in this process, written in one round trip.

    `count` takes a name of NAMES; `add` takes any field of any hash (the latency
    histograms: worker.histograms.observe_into). Until `start()` every call writes at
    once (what a test or a short-lived process wants); after it, a daemon thread writes
    every `every_s` seconds and once more at exit. Never raises; a failed write loses
    that interval's counts, as a failed `count` does.
    """

    def __init__(self, client: redis.Redis, every_s: float = FLUSH_EVERY_S) -> None:
        self._client = client
        self._every_s = every_s
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._ints: Counter[tuple[str, str]] = Counter()
        self._floats: dict[tuple[str, str], float] = {}
        self._stop: threading.Event | None = None

    def count(self, name: str, n: int = 1) -> None:
        self.count_many({name: n})

    def count_many(self, counts: Mapping[str, int]) -> None:
        with self._lock:
            self._counts.update(counts)
        if self._stop is None:
            self.flush()

    def add(self, key: str, field: str, n: int = 0, seconds: float = 0.0) -> None:
        """Add `n` (HINCRBY) and `seconds` (HINCRBYFLOAT) to `field` of hash `key`."""
        with self._lock:
            if n:
                self._ints[(key, field)] += n
            if seconds:
                self._floats[(key, field)] = self._floats.get((key, field), 0.0) + seconds
        if self._stop is None:
            self.flush()

    def flush(self) -> None:
        """Write what has been summed so far (one pipelined round trip)."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
            ints, self._ints = self._ints, Counter()
            floats, self._floats = self._floats, {}
        if not (counts or ints or floats):
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            _queue_counts(pipe, counts, time.time())
            for (key, field), n in ints.items():
                pipe.hincrby(key, field, n)
            for (key, field), seconds in floats.items():
                pipe.hincrbyfloat(key, field, seconds)
            pipe.execute()
        except Exception:  # noqa: S110 - telemetry must never fail the work it describes
            pass

    def start(self) -> Buffered:
        """Write in the background from now on (and at exit); returns self."""
        if self._stop is not None:
            return self
        stop = self._stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self._every_s):
                self.flush()

        threading.Thread(target=loop, name="kq-telemetry", daemon=True).start()
        atexit.register(self.close)
        return self

    def close(self) -> None:
        """Stop the background writes and write what is left."""
        if self._stop is not None:
            self._stop.set()
        self.flush()


def recent(client: redis.Redis, minutes: int, *, now: float | None = None) -> Counter[str]:
    """Sums over the last `minutes` minute buckets, the current (partial) one included."""
    ts = time.time() if now is None else now
    current = int(ts // 60)
    pipe = client.pipeline(transaction=False)
    for minute in range(current - max(0, minutes - 1), current + 1):
        pipe.hgetall(minute_key(minute))
    return _sum(pipe.execute())


def per_minute(
    client: redis.Redis, minutes: int, *, now: float | None = None
) -> list[tuple[int, dict[str, int]]]:
    """[(minute start as unix seconds, counters)] for the last `minutes` minutes, oldest first."""
    ts = time.time() if now is None else now
    current = int(ts // 60)
    span = list(range(current - max(0, minutes - 1), current + 1))
    pipe = client.pipeline(transaction=False)
    for minute in span:
        pipe.hgetall(minute_key(minute))
    return [(m * 60, dict(_sum([raw]))) for m, raw in zip(span, pipe.execute(), strict=True)]


def today(client: redis.Redis, *, now: float | None = None) -> Counter[str]:
    """Counters for the current UTC day."""
    return _sum([client.hgetall(day_key(time.time() if now is None else now))])


def totals(client: redis.Redis) -> Counter[str]:
    """Counters since this Redis was new (monotonic; for Prometheus)."""
    return _sum([client.hgetall(keys.TELEMETRY_TOTAL)])


def _sum(hashes: Iterable[Any]) -> Counter[str]:
    total: Counter[str] = Counter()
    for raw in hashes:
        for key, value in (raw or {}).items():
            total[as_str(key)] += as_int(value)
    return total


def as_str(value: Any) -> str:
    """A Redis reply as text, whether the client decodes replies or not."""
    return value.decode() if isinstance(value, bytes) else str(value)


def as_int(value: Any) -> int:
    """A Redis reply as an integer; 0 for anything that is not one."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
