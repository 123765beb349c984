"""Read how outbound webhooks are doing, from Redis only: a `snapshot.Forwarding`.

For each subscriber (the ones in Redis, those a running forwarder serves, and any
passed in, e.g. from the file): deliveries pending and dead, the oldest undelivered
one's age, how long the endpoint has been failing (no success since its first failed
attempt), the last error, and delivery counters by outcome. Plus what the router has
not handed out yet (the `kq-forward` group's pending entries and lag) and how many
`kq forward` processes are alive.

`kq forward status`, the forward exporter (`worker.metrics.ForwardCollector`) and the
`forward_failing` alarm (`worker.alarms.forward_alarms`) read it. Bounded: a few
commands per subscriber, no scans.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any, Final

import redis

from worker import keys
from worker.forward.outbox import GROUP, OUTCOMES
from worker.forward.subscribers import SOURCE_REDIS, Subscriber
from worker.snapshot import ForwardEndpoint, Forwarding

ROLE: Final = "forward"  # heartbeat role of `kq forward` (kq:heartbeat:forward:{host}:{pid})


def read_forwarding(
    client: redis.Redis,
    *,
    now: float | None = None,
    extra: Iterable[Subscriber] = (),
) -> Forwarding:
    """The outbound-webhook part of the status; raises redis.RedisError when Redis is away."""
    ts = time.time() if now is None else now
    sources: dict[str, str] = {}
    for sub in extra:
        sources[sub.id] = sub.source
    active: Any = client.hgetall(keys.FWD_ACTIVE)
    for sid, raw in (active or {}).items():
        sources.setdefault(_s(sid), _source_of(raw))
    for sid in client.hkeys(keys.FWD_SUBSCRIBERS) or []:
        sources[_s(sid)] = SOURCE_REDIS
    ids = sorted(sources)
    stats: Any = client.hgetall(keys.FWD_STATS)
    counts: dict[str, dict[str, int]] = {sid: dict.fromkeys(OUTCOMES, 0) for sid in ids}
    for name, value in (stats or {}).items():
        sid, _, outcome = _s(name).rpartition("|")
        if sid in counts and outcome in counts[sid]:
            counts[sid][outcome] = int(value)
    pipe = client.pipeline(transaction=False)
    for sid in ids:
        pipe.zcard(keys.fwd_due(sid))
        pipe.zcard(keys.fwd_dead(sid))
        pipe.zrange(keys.fwd_age(sid), 0, 0, withscores=True)
        pipe.hgetall(keys.fwd_health(sid))
    replies = pipe.execute()
    endpoints = []
    for i, sid in enumerate(ids):
        pending, dead, oldest, health = replies[4 * i : 4 * i + 4]
        health = {_s(k): _s(v) for k, v in (health or {}).items()}
        failing_since = _float(health.get("failing_since"))
        endpoints.append(
            ForwardEndpoint(
                subscriber=sid,
                source=sources[sid],
                pending=int(pending),
                dead=int(dead),
                oldest_undelivered_s=max(0.0, ts - float(oldest[0][1])) if oldest else None,
                failing_for_s=None if failing_since is None else max(0.0, ts - failing_since),
                last_error=health.get("last_error", "") if failing_since is not None else "",
                deliveries=counts[sid],
            )
        )
    unrouted, oldest_unrouted = _unrouted(client, ts)
    return Forwarding(
        endpoints=tuple(endpoints),
        unrouted=unrouted,
        oldest_unrouted_s=oldest_unrouted,
        forwarders=_forwarders(client, ts),
    )


def _unrouted(client: redis.Redis, now: float) -> tuple[int, float | None]:
    """Events the `kq-forward` group holds unacked or has not handed out yet, and the
    age of the oldest of them (from its stream id)."""
    try:
        groups: Any = client.xinfo_groups(keys.EVENTS)
    except redis.ResponseError:  # no stream yet
        return 0, None
    group = next((g for g in groups if _s(g.get("name")) == GROUP), None)
    if group is None:
        return 0, None
    pending = int(group.get("pending") or 0)
    lag = group.get("lag")
    oldest_id: str | None = None
    if pending:
        summary: Any = client.xpending(keys.EVENTS, GROUP)
        oldest_id = _s(summary.get("min")) if summary and summary.get("min") else None
    last = _s(group.get("last-delivered-id") or "0-0")
    nxt: Any = client.xrange(keys.EVENTS, min=f"({last}", max="+", count=1)
    if lag is None:  # the server could not tell (after deletions): count what is left
        lag = 0 if not nxt else client.xlen(keys.EVENTS)
    if nxt and oldest_id is None:
        oldest_id = _s(nxt[0][0])
    unrouted = pending + int(lag)
    if not unrouted or oldest_id is None:
        return unrouted, None
    written = int(oldest_id.split("-", 1)[0]) / 1000.0
    return unrouted, max(0.0, now - written)


def _forwarders(client: redis.Redis, now: float) -> int:
    prefix = keys.heartbeat_prefix(ROLE)
    live: Any = client.zrangebyscore(keys.HEARTBEATS, now, "+inf")
    return sum(1 for key in live if _s(key).startswith(prefix))


def _source_of(raw: Any) -> str:
    try:
        data = json.loads(_s(raw))
    except ValueError:
        return ""
    return str(data.get("source", "")) if isinstance(data, dict) else ""


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
