"""Admission control: one account-wide budget of provider slots and submits per minute,
shared by every worker process on every machine through Redis.

A slot is taken just before a submit and given back when the job becomes terminal or
goes back to `queued` (in the same Lua transition that records it), never when the
Celery task returns. A job that finds no slot waits in Redis — per-batch sorted sets
(priority, then arrival) served round-robin, so a small batch behind a big one starts
within seconds — and a dispatcher thread in each worker claims waiting jobs as slots
free up, woken by the release itself. Leases recover slots whose jobs vanished.
A 429 halves the allowed rate for everyone and pauses submits briefly; the rate then
climbs back by a tenth every 10 s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import redis

from worker import keys
from worker.scripts import LuaScript
from worker.settings import Settings

# A 429 pauses every worker's submits this long before the reduced rate applies.
RATE_LIMIT_PAUSE_S: Final = 2.0
# A slot outlives any legitimate holder by this much past the job deadline.
LEASE_MARGIN_S: Final = 120.0


@dataclass(frozen=True)
class Decision:
    """The answer to "may this job be submitted now?"."""

    granted: bool
    held_already: bool = False
    retry_after_s: float = 0.0


@dataclass(frozen=True)
class LinedUp:
    """Jobs put in the waiting line together (`Admission.line_up`)."""

    retry_after_s: float
    # Left out: each holds a slot already (another attempt of it has its turn).
    held: frozenset[str]


@dataclass(frozen=True)
class Snapshot:
    """Admission state for `kq status` and metrics."""

    slots_used: int
    slots_total: int
    submits_last_minute: int
    submits_per_minute_limit: int
    waiting: int
    rate_factor: float
    backoff_until: float
    rate_limited_total: int


_SCRIPT_KEYS = [
    keys.ADM_SLOTS,
    keys.ADM_SUBMITS,
    keys.ADM_CTL,
    keys.ADM_RR,
    keys.ADM_NWAIT,
    keys.ADM_SEQ,
    keys.ADM_CLAIMED,
]


class Admission:
    """The Redis side of admission control (see the module docstring)."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self._settings = settings
        self.max_in_flight = settings.max_in_flight
        self.max_per_minute = settings.max_submits_per_minute
        self.lease_s = settings.job_deadline_s + settings.http_timeout_s + LEASE_MARGIN_S
        self._script = LuaScript(
            client, resources.files("worker").joinpath("lua", "admission.lua").read_text()
        )

    def on_client(self, client: redis.Redis) -> Admission:
        """The same limits on another client of the same Redis."""
        return Admission(client, self._settings)

    def _call(self, op: str, now: float, *extra: Any, tail: Sequence[Any] = ()) -> Any:
        padded = [*extra, "", "", ""][:3]
        args = [op, now, self.max_in_flight, self.max_per_minute, self.lease_s, *padded]
        args += [keys.ADM_WAIT_PREFIX, keys.JOB_PREFIX, *tail]
        return self._script(keys=_SCRIPT_KEYS, args=args)

    def acquire(self, job_id: str, batch_id: str, priority: int, now: float) -> Decision:
        """Take a slot for this job, or put it in the waiting line."""
        answer, retry = self._call("acquire", now, job_id, batch_id, priority)
        if answer == "wait":
            return Decision(False, retry_after_s=float(retry))
        return Decision(True, held_already=answer == "held")

    def line_up(self, jobs: Sequence[tuple[str, str, int]], now: float) -> LinedUp | None:
        """`acquire` for many (job id, batch id, priority) in one call, when none of them
        could be granted a slot now: each is put in the waiting line, in turn, as a
        refused `acquire` puts it there. None when a slot may be free: nothing was done,
        ask job by job. (A big batch behind a full cap then costs a call per chunk, not
        a refused `acquire` per job.)"""
        tail = [field for job in jobs for field in job]
        answer = [str(x) for x in self._call("line_up", now, tail=tail)]
        if answer[0] == "free":
            return None
        return LinedUp(retry_after_s=float(answer[1]), held=frozenset(answer[2:]))

    def wait(self, job_id: str, batch_id: str, priority: int, now: float) -> None:
        """Give back this job's slot (if any) and line it up again (e.g. after a 429)."""
        self._call("wait", now, job_id, batch_id, priority)

    def claim(self, limit: int, now: float) -> tuple[list[str], float]:
        """Waiting jobs granted a slot now (round-robin over batches), and how long to
        sleep before asking again when none could be granted."""
        answer = [str(x) for x in self._call("claim", now, limit)]
        return answer[1:], float(answer[0])

    def penalize(self, now: float) -> None:
        """A 429 arrived: slow every worker down."""
        self._call("penalize", now, RATE_LIMIT_PAUSE_S)

    def is_waiting(self, job_id: str, batch_id: str) -> bool:
        """Whether the job sits in the waiting line (a dispatcher will hand it on)."""
        return self.redis.zscore(keys.admission_wait(batch_id), job_id) is not None

    def wait_for_wake(self, timeout_s: float) -> None:
        """Sleep until a slot is released somewhere, or `timeout_s` passes."""
        timeout = max(0.01, min(timeout_s, 5.0))
        self.redis.blpop([keys.ADM_WAKE], timeout=timeout)

    def snapshot(self, now: float) -> Snapshot:
        used, submits, waiting, factor, backoff, limited = self._call("snapshot", now)
        return Snapshot(
            slots_used=int(used),
            slots_total=self.max_in_flight,
            submits_last_minute=int(submits),
            submits_per_minute_limit=self.max_per_minute,
            waiting=int(waiting),
            rate_factor=float(factor),
            backoff_until=float(backoff),
            rate_limited_total=int(limited),
        )
