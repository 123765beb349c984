"""The `kq forward` process: one router, one lane per subscriber.

    router thread   reads the `kq-forward` consumer group on kq:events (its own unacked
                    entries first after a restart, then new ones; entries a dead forwarder
                    left pending are reclaimed), queues each event for every matching
                    subscriber and acks it in one MULTI (`Outbox.route`); reloads the
                    subscribers every couple of seconds (Redis and the file)
    lane            per subscriber: its own httpx client (a connection pool sized to its
                    concurrency limit), thread pool, timeouts and circuit breaker. It
                    leases due deliveries (`Outbox.claim`) only while it has a free slot
                    and its breaker allows, posts them signed, and settles each
                    (delivered / retry later / dead list)

A slow endpoint fills its own slots and nothing else; a dead one trips its breaker and
then costs one probe now and then. The router never waits on HTTP. Several `kq forward`
processes may run against one Redis: the group splits the routing, leases split the
deliveries.

Stopping (SIGTERM, Ctrl-C) lets the attempts in flight finish (each within its
timeout); a kill -9 leaves leases that run out and unacked group entries that are read
again: nothing is lost, a few deliveries may be sent twice.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
import redis
import structlog

from worker.errors import ConfigError
from worker.events import Event, EventConsumer
from worker.forward.outbox import GROUP, Delivery, Outbox
from worker.forward.policy import (
    DEFAULT_BREAKER_COOLDOWN_S,
    DEFAULT_BREAKER_MAX_COOLDOWN_S,
    DEFAULT_BREAKER_THRESHOLD,
    CircuitBreaker,
    RetryPolicy,
)
from worker.forward.signing import sign_headers, webhook_id
from worker.forward.subscribers import Subscriber, SubscriberStore
from worker.settings import Settings

log = structlog.get_logger("worker.forward")

# A response body is read only this far (error snippets, and to reuse the connection).
MAX_RESPONSE_BYTES: Final = 64 * 1024
ERROR_SNIPPET_CHARS: Final = 200
CONNECT_TIMEOUT_S: Final = 5.0


@dataclass(frozen=True)
class ForwardConfig:
    """Tunables of one forwarder process (`from_settings` for the KQ_FORWARD_* ones)."""

    timeout_s: float = 10.0  # per socket operation (write, read); connect is capped at 5 s
    concurrency: int = 4  # attempts in flight per endpoint (a subscriber may set its own)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker_threshold: int = DEFAULT_BREAKER_THRESHOLD
    breaker_cooldown_s: float = DEFAULT_BREAKER_COOLDOWN_S
    breaker_max_cooldown_s: float = DEFAULT_BREAKER_MAX_COOLDOWN_S
    consumer: str = field(default_factory=socket.gethostname)  # name in the group
    start: str = "$"  # where the group starts when this forwarder creates it
    poll_interval_s: float = 1.0  # lanes look for due retries at least this often
    reload_interval_s: float = 2.0  # subscriber changes are picked up this fast
    reclaim_every_s: float = 10.0
    reclaim_idle_ms: int = 60_000  # group entries a dead forwarder left pending this long
    expire_every_s: float = 30.0
    read_count: int = 100

    @property
    def lease_s(self) -> float:
        """How long a claimed delivery is ours: above the longest attempt (connect, write,
        read) with a margin, so a live attempt is never taken over."""
        return 3 * self.timeout_s + 10.0

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ForwardConfig:
        retry = RetryPolicy(
            base_s=settings.forward_retry_base_s, retry_for_s=settings.forward_retry_for_s
        )
        values: dict[str, Any] = {
            "timeout_s": settings.forward_timeout_s,
            "concurrency": settings.forward_concurrency,
            "retry": retry,
        }
        values.update(overrides)
        return cls(**values)


class Lane:
    """Deliveries to one subscriber: its pool, its limit, its breaker."""

    def __init__(
        self,
        sub: Subscriber,
        outbox: Outbox,
        config: ForwardConfig,
        *,
        clock: Callable[[], float] = time.time,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.sub = sub
        self.outbox = outbox
        self.config = config
        self.clock = clock
        self.limit = sub.concurrency or config.concurrency
        self.http = httpx.Client(
            timeout=httpx.Timeout(
                config.timeout_s, connect=min(CONNECT_TIMEOUT_S, config.timeout_s)
            ),
            limits=httpx.Limits(max_connections=self.limit, max_keepalive_connections=self.limit),
            follow_redirects=False,
            transport=transport,
        )
        self.breaker = CircuitBreaker(
            threshold=config.breaker_threshold,
            cooldown_s=config.breaker_cooldown_s,
            max_cooldown_s=config.breaker_max_cooldown_s,
            clock=time.monotonic,
        )
        self.pool = ThreadPoolExecutor(
            max_workers=self.limit, thread_name_prefix=f"kq-fwd-{sub.id}"
        )
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._thread = threading.Thread(target=self._run, name=f"kq-fwd-lane-{sub.id}", daemon=True)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def start(self) -> Lane:
        self._thread.start()
        return self

    def update(self, sub: Subscriber) -> None:
        """New secrets or filter; URL and concurrency changes get a new lane instead."""
        self.sub = sub

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()

    def close(self) -> None:
        """Stop claiming, let attempts in flight finish, release the connections."""
        self.stop()
        self._thread.join()
        self.pool.shutdown(wait=True)
        self.http.close()

    # --- the loop ---------------------------------------------------------------------

    def _run(self) -> None:
        sid = self.sub.id
        next_expire = 0.0
        while not self._stop.is_set():
            wait = self.config.poll_interval_s
            try:
                now = self.clock()
                if now >= next_expire:
                    parked = self.outbox.expire(sid, now, self.config.retry.retry_for_s)
                    if parked:
                        log.warning("forward.parked", subscriber=sid, count=parked)
                    next_expire = now + self.config.expire_every_s
                allowed, probe = self.breaker.allowance(self.limit, self.in_flight)
                if allowed:
                    claimed: list[Delivery] = []
                    try:
                        claimed, next_due = self.outbox.claim(
                            sid, now, allowed, now + self.config.lease_s
                        )
                    finally:
                        if probe and not claimed:  # nothing due (or Redis failed)
                            self.breaker.release_probe()
                    for delivery in claimed:
                        with self._lock:
                            self._in_flight += 1
                        self.pool.submit(self._attempt, delivery)
                    if next_due is not None and len(claimed) < allowed:
                        wait = min(wait, max(0.0, next_due - now))
                else:
                    until_probe = self.breaker.seconds_until_probe()
                    if until_probe:
                        wait = min(wait, until_probe)
            except redis.RedisError as exc:
                log.warning("forward.redis_error", subscriber=sid, error=type(exc).__name__)
                wait = 1.0
            except Exception as exc:  # never let one bad record stop the lane
                log.error("forward.lane_error", subscriber=sid, error=repr(exc), exc_info=True)
                wait = 1.0
            self.wake.wait(wait)
            self.wake.clear()

    def _attempt(self, delivery: Delivery) -> None:
        sub = self.sub
        recorded = False
        try:
            outcome, status, error = self._post(sub, delivery)
            ok = outcome == "delivered"
            self.breaker.record(ok)
            recorded = True
            now = self.clock()
            next_at = (
                None
                if ok
                else self.config.retry.next_attempt(
                    delivery.attempts + 1, delivery.queued_at, now, random.random
                )
            )
            self.outbox.settle(
                delivery, outcome=outcome, now=now, error=error, status=status, next_at=next_at
            )
            fields = {
                "subscriber": sub.id,
                "event_id": delivery.event_id,
                "attempt": delivery.attempts + 1,
            }
            if ok:
                log.debug("forward.delivered", status=status, **fields)
            elif next_at is None:
                log.warning("forward.dead_lettered", outcome=outcome, error=error, **fields)
            else:
                log.info(
                    "forward.retry",
                    outcome=outcome,
                    error=error,
                    next_in_s=round(next_at - now, 1),
                    **fields,
                )
        except redis.RedisError as exc:
            # Not recorded: the lease runs out and the delivery is tried again.
            log.warning("forward.redis_error", subscriber=sub.id, error=type(exc).__name__)
        except Exception as exc:
            log.error("forward.attempt_error", subscriber=sub.id, error=repr(exc), exc_info=True)
            if not recorded:  # count it as a failure, and free a probe slot it held
                self.breaker.record(False)
        finally:
            with self._lock:
                self._in_flight -= 1
            self.wake.set()

    def _post(self, sub: Subscriber, delivery: Delivery) -> tuple[str, int | None, str]:
        """(outcome, HTTP status, error text) of one signed POST."""
        now = self.clock()
        headers = sign_headers(
            webhook_id(sub.id, delivery.event_id), delivery.body, sub.active_secrets(now), now
        )
        try:
            with self.http.stream(
                "POST", sub.url, content=delivery.body.encode(), headers=headers
            ) as response:
                snippet = _read_some(response, deadline=time.monotonic() + self.config.timeout_s)
                status = response.status_code
        except httpx.TimeoutException as exc:
            return "timeout", None, f"{type(exc).__name__} after {self.config.timeout_s:g} s"
        except httpx.HTTPError as exc:
            return "connection_error", None, _clean(f"{type(exc).__name__}: {exc}", sub.url)
        if 200 <= status < 300:
            return "delivered", status, ""
        kind = "http_4xx" if 400 <= status < 500 else "http_5xx" if status >= 500 else "http_other"
        return kind, status, _clean(f"HTTP {status}: {snippet}".rstrip(": "), sub.url)


def _read_some(response: httpx.Response, *, deadline: float) -> str:
    """The start of the body (for error messages); stops at a size or time limit."""
    data = b""
    for chunk in response.iter_raw():
        data += chunk
        if len(data) >= MAX_RESPONSE_BYTES or time.monotonic() > deadline:
            break
    return data[:ERROR_SNIPPET_CHARS].decode("utf-8", "replace")


def _clean(text: str, url: str) -> str:
    """One line, short, and without the endpoint URL (it may carry a token)."""
    return " ".join(text.replace(url, "<url>").split())[:ERROR_SNIPPET_CHARS]


class Forwarder:
    """Route kq:events to the subscribers and deliver, until `stop` is set."""

    def __init__(
        self,
        client: redis.Redis,
        store: SubscriberStore,
        config: ForwardConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.config = config or ForwardConfig()
        self.clock = clock
        self.transport = transport
        self.outbox = Outbox(client)
        self.lanes: dict[str, Lane] = {}
        self._subscribers: list[Subscriber] = []
        self.ready = threading.Event()

    def run(self, stop: threading.Event) -> None:
        """The router loop; returns once stopped and the attempts in flight are done.

        ConfigError at start when the subscribers cannot be read (a bad file).
        """
        cfg = self.config
        self.outbox.ensure_group(cfg.start)
        consumer = self._consumer()
        self._reload(strict=True)
        log.info(
            "forward.started",
            consumer=cfg.consumer,
            subscribers=len(self._subscribers),
            timeout_s=cfg.timeout_s,
            concurrency=cfg.concurrency,
        )
        self.ready.set()
        next_reload = self.clock() + cfg.reload_interval_s
        next_reclaim = 0.0
        block_ms = max(1, int(cfg.poll_interval_s * 1000))
        try:
            while not stop.is_set():
                try:
                    now = self.clock()
                    if now >= next_reload:
                        self._reload(strict=False)
                        next_reload = now + cfg.reload_interval_s
                    if now >= next_reclaim:
                        self._route(consumer.reclaim(count=cfg.read_count))
                        next_reclaim = now + cfg.reclaim_every_s
                    self._route(consumer.read(count=cfg.read_count, block_ms=block_ms))
                except redis.RedisError as exc:
                    log.warning("forward.redis_error", part="router", error=type(exc).__name__)
                    stop.wait(1.0)
                    # A fresh consumer first re-reads what this one read but did not route.
                    consumer = self._consumer()
        finally:
            self._close()

    def _consumer(self) -> EventConsumer:
        cfg = self.config
        return EventConsumer(
            self.client,
            GROUP,
            cfg.consumer,
            start=cfg.start,
            reclaim_idle_ms=cfg.reclaim_idle_ms,
        )

    def _route(self, events: list[Event]) -> None:
        if not events:
            return
        # The subscribers as they are now (one HGETALL), so one added a moment ago gets
        # every event routed after it; its lane starts at the next reload.
        try:
            subscribers = list(self.store.all().values())
        except ConfigError:
            subscribers = self._subscribers  # the reload logs it
        queued = self.outbox.route(events, subscribers, self.clock())
        log.debug("forward.routed", events=len(events), deliveries=queued)
        if queued:
            for lane in self.lanes.values():
                lane.wake.set()

    def _reload(self, *, strict: bool) -> None:
        try:
            subs = self.store.all()
        except ConfigError as exc:
            if strict:
                raise
            log.error("forward.subscribers_unreadable", error=str(exc))
            return
        for sid in list(self.lanes):
            sub = subs.get(sid)
            lane = self.lanes[sid]
            if sub is None or sub.url != lane.sub.url or sub.concurrency != lane.sub.concurrency:
                del self.lanes[sid]
                threading.Thread(target=lane.close, daemon=True).start()
                if sub is None:
                    log.info("forward.subscriber_gone", subscriber=sid)
            elif sub != lane.sub:
                lane.update(sub)
        for sid, sub in subs.items():
            if sid not in self.lanes:
                self.lanes[sid] = Lane(
                    sub, self.outbox, self.config, clock=self.clock, transport=self.transport
                ).start()
                log.info("forward.subscriber", subscriber=sid, source=sub.source)
        self._subscribers = list(subs.values())
        self.outbox.publish_active(self._subscribers)

    def _close(self) -> None:
        lanes = list(self.lanes.values())
        self.lanes.clear()
        for lane in lanes:
            lane.stop()
        for lane in lanes:
            lane.close()
        try:
            self.outbox.publish_active([])
        except redis.RedisError:
            pass
        log.info("forward.stopped")
