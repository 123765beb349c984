"""Has a write reached a replica? Redis WAIT, for the moment before money is spent.

Replication is asynchronous: a primary that dies (and is replaced by a promoted replica)
can take its last writes with it. A `submitting` record lost that way would let the job be
submitted, and paid, a second time. So a submit asks for the record to reach
`KQ_REDIS_WAIT_REPLICAS` replicas first (`worker.service.submit`), and is put back,
unsent, when they do not confirm within `KQ_REDIS_WAIT_TIMEOUT_MS`.

WAIT counts the replicas that acknowledged the last write *of its own connection*, and
the pool hands each command any connection. The replication stream is one ordered log,
though: a marker written on the connection that then WAITs comes after every write that
had already been answered (the claim), so a replica that has the marker has the claim.
The job's hash is read back in the same pipeline: if the pipeline ran on another server
than the claim (redis-py reconnects and replays a pipeline after a failover), the claim
must be visible there too, or the answer is no.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from worker import keys


@dataclass(frozen=True)
class Replicated:
    """What WAIT said: how many replicas acknowledged, and whether that is enough."""

    confirmed: bool
    replicas: int
    detail: str = ""


def confirm_written(client: redis.Redis, *, replicas: int, timeout_ms: int) -> Replicated:
    """Wait until `replicas` replicas hold every write answered so far (the receiver asks
    before acknowledging a webhook: a delivery answered 200 whose effect a failover then
    loses would never be delivered again). Never raises: a Redis error is a no."""
    pipe = client.pipeline(transaction=False)
    pipe.incr(keys.REPLICATION_PROBE)
    pipe.execute_command("WAIT", replicas, timeout_ms)  # type: ignore[no-untyped-call]
    try:
        _, acked = pipe.execute()
    except redis.RedisError as exc:
        return Replicated(False, 0, f"redis: {type(exc).__name__}")
    acked = int(acked)
    if acked < replicas:
        return Replicated(False, acked, f"{acked} of {replicas} replicas within {timeout_ms} ms")
    return Replicated(True, acked)


def confirm_claim(
    client: redis.Redis,
    job_id: str,
    *,
    version: int,
    replicas: int,
    timeout_ms: int,
) -> Replicated:
    """Wait until `replicas` replicas hold the job's record at `version` (never raises:
    a Redis error is a "not confirmed")."""
    pipe = client.pipeline(transaction=False)
    pipe.incr(keys.REPLICATION_PROBE)
    pipe.execute_command("WAIT", replicas, timeout_ms)  # type: ignore[no-untyped-call]
    pipe.hget(keys.job(job_id), "version")
    try:
        _, acked, seen = pipe.execute()
    except redis.RedisError as exc:
        return Replicated(False, 0, f"redis: {type(exc).__name__}")
    acked = int(acked)
    if seen is None or int(seen) != version:
        return Replicated(False, acked, f"the record is at version {seen}, not {version}")
    if acked < replicas:
        return Replicated(False, acked, f"{acked} of {replicas} replicas within {timeout_ms} ms")
    return Replicated(True, acked)
