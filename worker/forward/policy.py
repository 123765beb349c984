"""When to try a delivery again, and when to stop trying an endpoint for a while. Pure.

Retry schedule (`RetryPolicy`, defaults): the first attempt right away; after the n-th
failed attempt, wait `base_s * 2**(n-1)` capped at `max_delay_s`, each wait jittered
uniformly by +/-25 % so a recovering endpoint is not hit by every delivery at once:

    10 s, 20 s, 40 s, 80 s, 2m40, 5m20, 10m40, 21m20, 42m40, then 1 h, 1 h, ...

A delivery is tried while the next attempt would still fall within `retry_for_s`
(24 h) of its first one: about 32 attempts, the last one some 23-24 h in; then it is
parked in the subscriber's dead list (`kq forward dlq list/replay`). Svix retries for
about a day and Stripe for three; a day covers a weekend outage's first day, and the
dead list covers the rest.

Circuit breaker (`CircuitBreaker`, one per endpoint): after `threshold` (5) attempts in
a row failed, the endpoint is left alone for `cooldown_s` (5 s); then a single probe
delivery goes out (half-open). Its success closes the breaker; its failure opens it
again for twice as long, up to `max_cooldown_s` (5 min). While it is open nothing is
sent there, so a dead endpoint costs no threads, connections or timeouts, and its
deliveries simply wait (their retry counters do not move).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

DEFAULT_BASE_S: Final = 10.0
DEFAULT_MAX_DELAY_S: Final = 3600.0
DEFAULT_RETRY_FOR_S: Final = 24 * 3600.0
DEFAULT_JITTER: Final = 0.25
DEFAULT_BREAKER_THRESHOLD: Final = 5
DEFAULT_BREAKER_COOLDOWN_S: Final = 5.0
DEFAULT_BREAKER_MAX_COOLDOWN_S: Final = 300.0


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off with jitter, for `retry_for_s` after the first attempt."""

    base_s: float = DEFAULT_BASE_S
    max_delay_s: float = DEFAULT_MAX_DELAY_S
    retry_for_s: float = DEFAULT_RETRY_FOR_S
    jitter: float = DEFAULT_JITTER

    def nominal_delay(self, attempts: int) -> float:
        """The wait after `attempts` failed attempts, before jitter."""
        exponent = min(max(0, attempts - 1), 62)
        return float(min(self.max_delay_s, self.base_s * 2.0**exponent))

    def delay(self, attempts: int, rand: Callable[[], float] = random.random) -> float:
        """The jittered wait after `attempts` failed attempts (`rand` in [0, 1))."""
        spread = self.jitter * (2.0 * rand() - 1.0)
        return self.nominal_delay(attempts) * (1.0 + spread)

    def next_attempt(
        self,
        attempts: int,
        first_at: float,
        now: float,
        rand: Callable[[], float] = random.random,
    ) -> float | None:
        """When to try again after `attempts` failures (the first at `first_at`), or None:
        the retry window is over, park the delivery."""
        at = now + self.delay(attempts, rand)
        return at if at - first_at <= self.retry_for_s else None

    def schedule(self) -> list[float]:
        """The nominal waits of a delivery that always fails (for docs and tests)."""
        waits: list[float] = []
        elapsed = 0.0
        while True:
            wait = self.nominal_delay(len(waits) + 1)
            if elapsed + wait > self.retry_for_s:
                return waits
            waits.append(wait)
            elapsed += wait


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Per-endpoint breaker (thread-safe). Ask `allowance` how many attempts may be in
    flight now; report each attempt's result with `record`."""

    def __init__(
        self,
        *,
        threshold: int = DEFAULT_BREAKER_THRESHOLD,
        cooldown_s: float = DEFAULT_BREAKER_COOLDOWN_S,
        max_cooldown_s: float = DEFAULT_BREAKER_MAX_COOLDOWN_S,
        clock: Callable[[], float],
    ) -> None:
        self.threshold = max(1, threshold)
        self.base_cooldown_s = cooldown_s
        self.max_cooldown_s = max(cooldown_s, max_cooldown_s)
        self.clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._cooldown_s = cooldown_s
        self._open_until: float | None = None
        self._probing = False

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._state()

    def _state(self) -> BreakerState:
        if self._open_until is None:
            return BreakerState.CLOSED
        if self.clock() < self._open_until:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def allowance(self, limit: int, in_flight: int) -> tuple[int, bool]:
        """(how many more attempts may start now, whether that one is a probe), given
        `in_flight` running and a concurrency `limit`. Half-open allows one probe at a
        time and marks it taken: hand it back with `release_probe` if it went unused."""
        with self._lock:
            state = self._state()
            if state is BreakerState.CLOSED:
                return max(0, limit - in_flight), False
            if state is BreakerState.OPEN or self._probing or in_flight:
                return 0, False
            self._probing = True
            return 1, True

    def release_probe(self) -> None:
        """The probe slot taken by `allowance` was not used (nothing was due)."""
        with self._lock:
            self._probing = False

    def seconds_until_probe(self) -> float:
        """0 unless open: then how long until a probe may go."""
        with self._lock:
            if self._open_until is None:
                return 0.0
            return max(0.0, self._open_until - self.clock())

    def record(self, ok: bool) -> None:
        """One attempt's result."""
        with self._lock:
            was_probe = self._probing
            self._probing = False
            if ok:
                self._failures = 0
                self._open_until = None
                self._cooldown_s = self.base_cooldown_s
                return
            self._failures += 1
            if was_probe and self._open_until is not None:
                self._cooldown_s = min(self.max_cooldown_s, self._cooldown_s * 2)
                self._open_until = self.clock() + self._cooldown_s
            elif self._open_until is None and self._failures >= self.threshold:
                self._open_until = self.clock() + self._cooldown_s
