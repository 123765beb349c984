"""The forwarder's state in Redis: routing events to subscribers, leases, retries, dead lists.

Every delivery's life is a few atomic steps, so a `kq forward` killed at any moment loses
nothing (at-least-once):

1. **Route** (`route`): the consumer group `kq-forward` on kq:events hands out events;
   for each, every matching subscriber gets the rendered body (`kq:fwd:body:{id}`),
   a due time (`kq:fwd:due:{id}`) and its queued time (`kq:fwd:age:{id}`), and the event
   is XACKed, all in one MULTI. Killed before it, the event is still pending in the group
   and is read again (the same consumer name) or reclaimed (another consumer).
2. **Claim** (`claim`, lua/claim.lua): due deliveries are leased (their due score moved
   to the lease's end), so parallel forwarders do not send the same one twice; a lease
   that runs out (the forwarder died mid-request) makes it due again.
3. **Settle** (`settle`, lua/settle.lua): delivered -> removed; failed -> rescheduled,
   or parked in the dead list (`kq:fwd:dead:{id}`) when its retry window is over.
   Counters (`kq:fwd:stats`) and the endpoint's health (`kq:fwd:health:{id}`) are
   written in the same round trip.

`expire` parks what a long-open circuit breaker kept from ever being retried; `replay`
and `purge` work the dead list. Entry ids are kq:events stream ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import redis

from worker import keys
from worker.events import Event
from worker.forward.signing import render
from worker.forward.subscribers import Subscriber, describe

GROUP: Final = "kq-forward"
# A forwarder's `kq:fwd:active` list outlives it by this much (it refreshes every 2 s).
ACTIVE_TTL_S: Final = 30
OUTCOMES: Final = (
    "delivered",  # 2xx
    "http_4xx",
    "http_5xx",
    "http_other",  # 1xx/3xx: redirects are not followed
    "timeout",
    "connection_error",  # refused, reset, closed without an answer, TLS, DNS
    "dead_lettered",  # parked after its retry window (not an attempt)
)
_PAGE: Final = 500


def _script(name: str) -> str:
    return resources.files("worker.forward").joinpath("lua", name).read_text()


@dataclass(frozen=True)
class Delivery:
    """One event owed to one subscriber, as leased by `claim`."""

    subscriber_id: str
    event_id: str
    body: str
    attempts: int  # failed attempts so far
    queued_at: float  # start of its retry window (routed, or replayed)


@dataclass(frozen=True)
class DeadDelivery:
    """A parked delivery (`kq forward dlq list`)."""

    subscriber_id: str
    event_id: str
    parked_at: float
    attempts: int
    last_error: str
    job_id: str
    state: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "subscriber": self.subscriber_id,
            "event_id": self.event_id,
            "job_id": self.job_id,
            "state": self.state,
            "parked_at": self.parked_at,
            "attempts": self.attempts,
            "last_error": self.last_error,
        }


class Outbox:
    """The Redis side of `kq forward` (thread-safe: one client, atomic steps)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._claim = client.register_script(_script("claim.lua"))
        self._settle = client.register_script(_script("settle.lua"))
        self._expire = client.register_script(_script("expire.lua"))
        self._replay = client.register_script(_script("replay.lua"))
        self._purge = client.register_script(_script("purge.lua"))

    # --- 1. routing -------------------------------------------------------------------

    def ensure_group(self, start: str = "$") -> bool:
        """Create the `kq-forward` group if missing (at `start`: "$" = from now on)."""
        try:
            self.client.xgroup_create(keys.EVENTS, GROUP, id=start, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            return False
        return True

    def route(self, events: Sequence[Event], subscribers: Iterable[Subscriber], now: float) -> int:
        """Queue each event for every subscriber it matches and ack it, atomically.

        Returns how many deliveries were queued.
        """
        if not events:
            return 0
        subs = list(subscribers)
        pipe = self.client.pipeline(transaction=True)
        queued = 0
        for event in events:
            body: str | None = None
            for sub in subs:
                if not sub.matches(event):
                    continue
                body = body or render(event)
                pipe.hsetnx(keys.fwd_body(sub.id), event.id, body)
                pipe.zadd(keys.fwd_due(sub.id), {event.id: now}, nx=True)
                pipe.zadd(keys.fwd_age(sub.id), {event.id: now}, nx=True)
                queued += 1
        pipe.xack(keys.EVENTS, GROUP, *(e.id for e in events))
        pipe.execute()
        return queued

    def publish_active(self, subscribers: Sequence[Subscriber]) -> None:
        """Tell readers (`kq forward status`, metrics) which subscribers are served."""
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(keys.FWD_ACTIVE)
        for sid, summary in describe(subscribers).items():
            pipe.hset(keys.FWD_ACTIVE, sid, summary)
        pipe.expire(keys.FWD_ACTIVE, ACTIVE_TTL_S)
        pipe.execute()

    # --- 2. claiming --------------------------------------------------------------------

    def claim(
        self, subscriber_id: str, now: float, limit: int, lease_until: float
    ) -> tuple[list[Delivery], float | None]:
        """Lease up to `limit` due deliveries; also the earliest due time left (or None)."""
        if limit <= 0:
            return [], self.next_due(subscriber_id)
        sid = subscriber_id
        reply: Any = self._claim(
            keys=[keys.fwd_due(sid), keys.fwd_body(sid), keys.fwd_meta(sid), keys.fwd_age(sid)],
            args=[now, lease_until, limit],
        )
        *flat, nxt = reply
        out: list[Delivery] = []
        for i in range(0, len(flat), 4):
            event_id, body, meta_raw, queued = flat[i : i + 4]
            meta = _meta(meta_raw)
            out.append(
                Delivery(
                    subscriber_id=sid,
                    event_id=_s(event_id),
                    body=_s(body),
                    attempts=int(meta.get("n", 0)),
                    queued_at=float(queued),
                )
            )
        return out, None if nxt is None else float(nxt)

    def next_due(self, subscriber_id: str) -> float | None:
        first: Any = self.client.zrange(keys.fwd_due(subscriber_id), 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    # --- 3. settling -----------------------------------------------------------------

    def settle(
        self,
        delivery: Delivery,
        *,
        outcome: str,
        now: float,
        error: str = "",
        status: int | None = None,
        next_at: float | None = None,
    ) -> bool:
        """Record an attempt: `delivered` removes it; otherwise `next_at` reschedules it,
        or (None) parks it in the dead list. Counters and health go in the same round
        trip. False if the delivery was no longer queued (someone else settled it)."""
        sid = delivery.subscriber_id
        ok = outcome == "delivered"
        mode = "done" if ok else ("retry" if next_at is not None else "dead")
        meta = {
            "n": delivery.attempts + (0 if ok else 1),
            "err": error,
            "status": status,
            "at": now,
            "outcome": outcome,
        }
        health = keys.fwd_health(sid)
        pipe = self.client.pipeline(transaction=True)
        self._settle(
            keys=[
                keys.fwd_due(sid),
                keys.fwd_age(sid),
                keys.fwd_body(sid),
                keys.fwd_meta(sid),
                keys.fwd_dead(sid),
            ],
            args=[delivery.event_id, mode, now if next_at is None else next_at, json.dumps(meta)],
            client=pipe,
        )
        pipe.hincrby(keys.FWD_STATS, f"{sid}|{outcome}", 1)
        if mode == "dead":
            pipe.hincrby(keys.FWD_STATS, f"{sid}|dead_lettered", 1)
        if ok:
            pipe.hset(health, mapping={"last_success_at": now, "consecutive_failures": 0})
            pipe.hdel(health, "failing_since")
        else:
            pipe.hsetnx(health, "failing_since", now)
            pipe.hset(health, mapping={"last_failure_at": now, "last_error": error[:300]})
            pipe.hincrby(health, "consecutive_failures", 1)
        recorded, *_ = pipe.execute()
        return bool(recorded)

    def expire(self, subscriber_id: str, now: float, retry_for_s: float) -> int:
        """Park deliveries queued more than `retry_for_s` ago that wait unattempted."""
        sid = subscriber_id
        parked = 0
        while True:
            n = int(
                self._expire(
                    keys=[
                        keys.fwd_due(sid),
                        keys.fwd_age(sid),
                        keys.fwd_meta(sid),
                        keys.fwd_dead(sid),
                    ],
                    args=[now - retry_for_s, now, _PAGE, "retry window over (endpoint down)"],
                )
            )
            parked += n
            if n < _PAGE:
                break
        if parked:
            self.client.hincrby(keys.FWD_STATS, f"{sid}|dead_lettered", parked)
        return parked

    # --- the dead list -------------------------------------------------------------------

    def dead(self, subscriber_id: str, *, limit: int = 100, offset: int = 0) -> list[DeadDelivery]:
        """Parked deliveries, oldest parked first."""
        sid = subscriber_id
        rows: Any = self.client.zrange(
            keys.fwd_dead(sid), offset, offset + limit - 1, withscores=True
        )
        if not rows:
            return []
        ids = [_s(i) for i, _ in rows]
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(keys.fwd_meta(sid), ids)
        pipe.hmget(keys.fwd_body(sid), ids)
        metas, bodies = pipe.execute()
        out: list[DeadDelivery] = []
        for (event_id, parked), meta_raw, body in zip(
            [(i, float(score)) for i, (_, score) in zip(ids, rows, strict=True)],
            metas,
            bodies,
            strict=True,
        ):
            meta = _meta(meta_raw)
            data = _body_data(body)
            out.append(
                DeadDelivery(
                    subscriber_id=sid,
                    event_id=event_id,
                    parked_at=parked,
                    attempts=int(meta.get("n", 0)),
                    last_error=str(meta.get("err") or ""),
                    job_id=str(data.get("job_id", "")),
                    state=str(data.get("state", "")),
                )
            )
        return out

    def dead_ids(self, subscriber_id: str) -> list[str]:
        raw: Any = self.client.zrange(keys.fwd_dead(subscriber_id), 0, -1)
        return [_s(i) for i in raw]

    def replay(self, subscriber_id: str, event_ids: Sequence[str], now: float) -> int:
        """Queue parked deliveries again, due now, with a fresh retry window."""
        sid = subscriber_id
        moved = 0
        for start in range(0, len(event_ids), _PAGE):
            moved += int(
                self._replay(
                    keys=[
                        keys.fwd_dead(sid),
                        keys.fwd_due(sid),
                        keys.fwd_age(sid),
                        keys.fwd_meta(sid),
                        keys.fwd_body(sid),
                    ],
                    args=[now, *event_ids[start : start + _PAGE]],
                )
            )
        return moved

    def purge(self, subscriber_id: str, event_ids: Sequence[str]) -> int:
        """Drop parked deliveries for good."""
        sid = subscriber_id
        dropped = 0
        for start in range(0, len(event_ids), _PAGE):
            dropped += int(
                self._purge(
                    keys=[keys.fwd_dead(sid), keys.fwd_meta(sid), keys.fwd_body(sid)],
                    args=list(event_ids[start : start + _PAGE]),
                )
            )
        return dropped


def _meta(raw: Any) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        data = json.loads(_s(raw))
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _body_data(raw: Any) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        data = json.loads(_s(raw)).get("data", {})
    except (ValueError, AttributeError):
        return {}
    return data if isinstance(data, dict) else {}


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
