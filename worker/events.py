"""Read the result events of `kq:events`: decode, replay, follow, consume with a group.

The contract (fields, guarantees, retention) is written down in docs/events.md; this
module is its Python side. Three ways to read:

- `replay(client, since=...)`: every retained event from an id or a time, oldest first.
- `follow(client, since=...)`: the same, then block for new ones (no acks, no state).
- `EventConsumer(client, group, consumer)`: a consumer group (created on first use).
  Each event is delivered to one consumer of the group; it stays pending until
  `ack`. A consumer that crashes before acking gets its pending events again when it
  restarts under the same name (`read` first re-reads its own pending entries), and
  `reclaim` takes over what a consumer that never comes back left pending (XAUTOCLAIM).
  That is at-least-once delivery: process idempotently (keyed by `job_id`).

The stream holds three types of event (`worker.event_types`): `job` (one per finished
job), `chain` (one per finished chain run) and `outputs` (a job's outputs copied out).
Readers yield all of them unless `types` names some. A batch filter and a type filter
apply to all three ways; in a group, events filtered out are acked on sight, since the
group has no other use for them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import redis

from worker import keys

# Re-exported: a consumer imports the whole events API from this module.
from worker.event_types import (
    CHAIN,
    EVENT_TYPES,
    JOB,
    OUTPUTS,
    SCHEMA_VERSION,
    ChainEvent,
    Event,
    OutputsEvent,
    ResultEvent,
    StoredOutput,
    as_text,
    decode_any,
    decode_chain_event,
    decode_event,
    decode_outputs_event,
    event_type,
)

# Pending entries idle this long belong to a consumer presumed dead (XAUTOCLAIM).
DEFAULT_RECLAIM_IDLE_MS: Final = 60_000
DEFAULT_READ_COUNT: Final = 100
_PAGE: Final = 500
_STREAM_ID = re.compile(r"^\d+(-\d+)?$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: str, *, now: float | None = None) -> str:
    """Turn a user's `--since` into a stream id.

    Accepts a stream id (`1712345678901-0`, or bare milliseconds), `0`/`beginning`,
    `now`/`$` (only what comes next), a duration back from now (`90s`, `15m`, `2h`,
    `1d`), unix seconds with a fraction (`1712345678.5`), or an ISO 8601 time (UTC
    when it has no zone).
    """
    text = value.strip()
    current = time.time() if now is None else now
    if text in ("0", "beginning", "-"):
        return "0-0"
    if text in ("now", "$"):
        return "$"
    if _STREAM_ID.match(text) and (len(text.split("-")[0]) >= 12 or "-" in text):
        return text if "-" in text else f"{text}-0"
    duration = _DURATION.match(text)
    if duration:
        return time_to_id(current - float(duration.group(1)) * _UNITS[duration.group(2)])
    try:
        return time_to_id(float(text))
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"--since: expected a stream id, a duration (15m, 2h), unix seconds, an ISO time, "
            f"'beginning' or 'now'; got {value!r}"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return time_to_id(parsed.timestamp())


def time_to_id(ts: float) -> str:
    """The smallest stream id at or after unix time `ts`."""
    return f"{max(0, int(ts * 1000))}-0"


def replay(
    client: redis.Redis,
    since: str = "0-0",
    *,
    batch_id: str | None = None,
    types: Collection[str] | None = None,
    until: str = "+",
    stream: str = keys.EVENTS,
) -> Iterator[Event]:
    """Every retained event from stream id `since` (inclusive) to `until`, oldest first.

    Pages through XRANGE, so a long stream is never loaded at once.
    """
    start = since
    while True:
        entries: Any = client.xrange(stream, min=start, max=until, count=_PAGE)
        for entry_id, raw in entries:
            event = decode_any(entry_id, raw)
            if wanted(event, batch_id, types):
                yield event
        if len(entries) < _PAGE:
            return
        start = f"({as_text(entries[-1][0])}"


def latest(client: redis.Redis, count: int, *, stream: str = keys.EVENTS) -> list[Event]:
    """The newest `count` events, newest first."""
    entries: Any = client.xrevrange(stream, count=count)
    return [decode_any(i, raw) for i, raw in entries]


def follow(
    client: redis.Redis,
    since: str = "$",
    *,
    batch_id: str | None = None,
    types: Collection[str] | None = None,
    block_ms: int = 5_000,
    stream: str = keys.EVENTS,
    stop: Any = None,
) -> Iterator[Event]:
    """Replay from `since` (unless it is `$`), then block for new events until `stop()`.

    `stop` is an optional callable checked between blocking reads.
    """
    last = since
    if since != "$":
        for event in replay(client, since, batch_id=batch_id, types=types, stream=stream):
            last = event.id
            yield event
        if last == since:
            # Nothing retained at or after `since`: continue from there, exclusive of
            # nothing; XREAD is exclusive, so step back to the id just before it.
            last = _before(since)
    else:
        # Resolve `$` once, so events appended between two XREADs are not skipped.
        info: Any = client.xrevrange(stream, count=1)
        last = as_text(info[0][0]) if info else "0-0"
    while stop is None or not stop():
        reply: Any = client.xread({stream: last}, count=DEFAULT_READ_COUNT, block=block_ms)
        for _name, entries in reply or []:
            for entry_id, raw in entries:
                last = as_text(entry_id)
                event = decode_any(entry_id, raw)
                if wanted(event, batch_id, types):
                    yield event


class EventConsumer:
    """One named consumer in a consumer group on `kq:events` (at-least-once delivery).

    Typical loop::

        consumer = EventConsumer(client, "billing", "billing-1")
        while True:
            for event in consumer.read(block_ms=5000):
                handle(event)            # idempotent, keyed by event.job_id
                consumer.ack(event.id)
            consumer.reclaim()           # take over what dead consumers left pending
    """

    def __init__(
        self,
        client: redis.Redis,
        group: str,
        consumer: str,
        *,
        start: str = "0-0",
        batch_id: str | None = None,
        types: Collection[str] | None = None,
        reclaim_idle_ms: int = DEFAULT_RECLAIM_IDLE_MS,
        stream: str = keys.EVENTS,
    ) -> None:
        if not group or not consumer:
            raise ValueError("group and consumer names must be non-empty")
        self.client = client
        self.group = group
        self.consumer = consumer
        self.start = start
        self.batch_id = batch_id
        self.types = types
        self.reclaim_idle_ms = reclaim_idle_ms
        self.stream = stream
        # After a restart, first hand back what this consumer read but never acked.
        self._backlog = True
        self._group_ready = False

    def ensure_group(self) -> bool:
        """Create the group (and the stream) if missing; True if it was created now.

        A new group starts at `start` ("0-0": every retained event; "$": only new ones).
        An existing group keeps its position: `start` is not applied to it.
        """
        try:
            self.client.xgroup_create(self.stream, self.group, id=self.start, mkstream=True)
            created = True
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            created = False
        self._group_ready = True
        return created

    def read(self, count: int = DEFAULT_READ_COUNT, block_ms: int | None = None) -> list[Event]:
        """The next events for this consumer: its own unacked ones first, then new ones.

        Returned events are pending until `ack`ed. `block_ms`: wait that long for new
        events when there are none (None: do not wait).
        """
        if not self._group_ready:
            self.ensure_group()
        while True:
            if self._backlog:
                entries, dropped = self._xreadgroup("0", count, None)
                if not entries:
                    self._backlog = bool(dropped)  # only trimmed ones: look again
                    continue
            else:
                entries, _ = self._xreadgroup(">", count, block_ms)
                if not entries:
                    return []
            events = self._keep(entries)
            if events:  # else all were another batch's, acked: read on
                return events

    def ack(self, *event_ids: str) -> int:
        """Mark events processed; they are never delivered to this group again."""
        if not event_ids:
            return 0
        return int(self.client.xack(self.stream, self.group, *event_ids))

    def reclaim(
        self, min_idle_ms: int | None = None, count: int = DEFAULT_READ_COUNT
    ) -> list[Event]:
        """Take over events other consumers left pending for `min_idle_ms` (XAUTOCLAIM).

        The claimed events become this consumer's pending entries: process and ack
        them like read ones. Entries whose event was trimmed away are dropped from the
        pending list by Redis itself.
        """
        if not self._group_ready:
            self.ensure_group()
        idle = self.reclaim_idle_ms if min_idle_ms is None else min_idle_ms
        claimed: list[tuple[Any, Any]] = []
        cursor = "0-0"
        while len(claimed) < count:
            reply: Any = self.client.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                min_idle_time=idle,
                start_id=cursor,
                count=count - len(claimed),
            )
            cursor = as_text(reply[0])
            claimed.extend((i, raw) for i, raw in reply[1] if raw is not None)
            if cursor == "0-0":
                break
        return self._keep(claimed)

    def pending_count(self) -> int:
        """Events delivered to this group and not yet acked (all consumers)."""
        if not self._group_ready:
            self.ensure_group()
        summary: Any = self.client.xpending(self.stream, self.group)
        return int(summary.get("pending", 0)) if isinstance(summary, dict) else 0

    def _xreadgroup(
        self, last: str, count: int, block_ms: int | None
    ) -> tuple[list[tuple[Any, Any]], int]:
        """(entries with data, how many pending entries had lost theirs to trimming)."""
        reply: Any = self.client.xreadgroup(
            self.group, self.consumer, {self.stream: last}, count=count, block=block_ms
        )
        entries: list[tuple[Any, Any]] = []
        gone: list[str] = []
        for _name, items in reply or []:
            for entry_id, raw in items:
                if raw:
                    entries.append((entry_id, raw))
                else:
                    gone.append(as_text(entry_id))
        # A pending entry whose event was trimmed comes back with no fields: there is
        # nothing left to deliver, so drop it from the pending list.
        self.ack(*gone)
        return entries, len(gone)

    def _keep(self, entries: Sequence[tuple[Any, Any]]) -> list[Event]:
        events = [decode_any(i, raw) for i, raw in entries]
        if self.batch_id is None and self.types is None:
            return events
        self.ack(*(e.id for e in events if not wanted(e, self.batch_id, self.types)))
        return [e for e in events if wanted(e, self.batch_id, self.types)]


def wanted(event: Event, batch_id: str | None, types: Collection[str] | None) -> bool:
    """The readers' filter: the event's batch (when one is named) and type (when named)."""
    return (batch_id is None or event.batch_id == batch_id) and (
        types is None or event.type in types
    )


def _before(stream_id: str) -> str:
    ms, _, seq = stream_id.partition("-")
    if seq and int(seq) > 0:
        return f"{ms}-{int(seq) - 1}"
    return f"{max(0, int(ms) - 1)}-{2**64 - 1}" if int(ms) > 0 else "0-0"


__all__ = [
    "CHAIN",
    "EVENT_TYPES",
    "JOB",
    "OUTPUTS",
    "SCHEMA_VERSION",
    "ChainEvent",
    "Event",
    "EventConsumer",
    "OutputsEvent",
    "ResultEvent",
    "StoredOutput",
    "decode_any",
    "decode_chain_event",
    "decode_event",
    "decode_outputs_event",
    "event_type",
    "follow",
    "latest",
    "parse_since",
    "replay",
    "time_to_id",
]
