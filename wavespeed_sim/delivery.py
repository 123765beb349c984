"""Webhook sender: signed POSTs with retries and backoff, off the scheduler's thread.

One *message* is one webhook (one ``webhook-id``, one body). A *delivery* is one chain of
attempts to send a message: the first attempt, then on a non-2xx answer or no answer up
to ``webhook_retries`` more, ``webhook_retry_base_s * 2**n`` apart, then it gives up for
good. A duplicated message is two deliveries of the same message (same id, same body).

A dispatcher thread keeps a heap of attempts that are due and hands each to a small
thread pool (a first attempt due at once goes to the pool directly), so a slow receiver
(up to ``webhook_timeout_s`` per attempt) never stalls the lifecycle scheduler or other
receivers. Connections to receivers are kept alive and reused (``webhook_http``).
Attempts are re-signed at send time: the ``webhook-timestamp`` is the send time in real
Unix seconds (not the sim clock, since receivers compare it with their own clock).
"""

from __future__ import annotations

import heapq
import itertools
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from http.client import HTTPException

from wavespeed_sim import signing
from wavespeed_sim.config import TASK_ERRORS
from wavespeed_sim.state import Task, new_id
from wavespeed_sim.webhook_http import WebhookClient

STALE_SKEW_S = 900  # a stale timestamp is this far in the past: well outside the 300 s window
DUPLICATE_GAP_S = 0.05  # the second copy of a duplicated message follows the first this closely
FOLLOW_UP_GAP_S = 0.05  # a late contradictory message follows the end of the first delivery
LATE_FAILED_CODE = 5000  # the task code carried by a contradictory late "failed" webhook


def compact_json(obj: object) -> bytes:
    """The webhook body encoding: compact JSON, UTF-8."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class Message:
    """One webhook as WaveSpeed would send it, plus the faults that shape its sending."""

    webhook_id: str
    task_id: str
    url: str
    body: bytes
    body_status: str
    kind: str  # "final" (the one per task) or "late_failed" (the contradictory extra)
    bad_signature: bool = False
    stale_timestamp: bool = False


def task_messages(task: Task) -> tuple[Message, Message | None]:
    """The webhook of an ended task, and the contradictory late one if it drew that fault."""
    assert task.webhook is not None
    prediction = task.webhook_body()
    message = Message(
        webhook_id=new_id(),
        task_id=task.id,
        url=task.webhook,
        body=compact_json(prediction),
        body_status=task.status,
        kind="final",
        bad_signature=task.faults.bad_signature,
        stale_timestamp=task.faults.stale_timestamp,
    )
    if not (task.faults.late_failed and task.status == "completed"):
        return message, None
    contradiction = dict(prediction)
    contradiction.update(
        outputs=[],
        has_nsfw_contents=[],
        status="failed",
        error=TASK_ERRORS[LATE_FAILED_CODE],
        code=LATE_FAILED_CODE,
    )
    late = replace(
        message,
        webhook_id=new_id(),
        body=compact_json(contradiction),
        body_status="failed",
        kind="late_failed",
    )
    return message, late


@dataclass(frozen=True)
class DeliverySettings:
    """The knobs read at each attempt, so runtime patches apply to deliveries in flight."""

    secret: str
    timeout_s: float
    retries: int
    retry_base_s: float


@dataclass
class Attempt:
    """One HTTP POST of a message."""

    number: int
    sent_at: float
    webhook_timestamp: int
    signature: str
    status_code: int | None = None
    error: str | None = None
    duration_s: float = 0.0


@dataclass
class Delivery:
    """One chain of attempts to send a message."""

    message: Message
    copy: int  # 1, or 2 for the second copy of a duplicated message
    delayed_s: float
    follow_up: Message | None = None
    generation: int = 0  # deliveries from before a reset are dropped, not retried
    state: str = "pending"  # pending -> acknowledged | given_up
    attempts: list[Attempt] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready view for ``GET /_sim/tasks``."""
        m = self.message
        return {
            "webhook_id": m.webhook_id,
            "url": m.url,
            "kind": m.kind,
            "body_status": m.body_status,
            "copy": self.copy,
            "delayed_s": self.delayed_s,
            "bad_signature": m.bad_signature,
            "stale_timestamp": m.stale_timestamp,
            "state": self.state,
            "attempts": [dict(a.__dict__) for a in self.attempts],
        }


class Deliverer:
    """Sends messages; keeps every delivery per task as ground truth."""

    def __init__(self, settings: Callable[[], DeliverySettings], workers: int) -> None:
        self._settings = settings
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Delivery]] = []
        self._counter = itertools.count()
        self._by_task: dict[str, list[Delivery]] = {}
        self._generation = 0
        self._stopping = False
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sim-webhook")
        self._http = WebhookClient()
        self._thread = threading.Thread(target=self._dispatch, name="sim-dispatch", daemon=True)

    def start(self) -> None:
        """Start the dispatcher thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sending; attempts already on the wire finish (bounded by the timeout)."""
        with self._cond:
            self._stopping = True
            self._heap.clear()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._http.close()

    def reset(self) -> None:
        """Forget pending attempts and all records (attempts on the wire finish unrecorded)."""
        with self._cond:
            self._heap.clear()
            self._by_task = {}
            self._generation += 1

    def send(
        self,
        message: Message,
        *,
        delay_s: float = 0.0,
        duplicate: bool = False,
        follow_up: Message | None = None,
    ) -> None:
        """Queue a message; ``follow_up`` is sent once the first delivery has ended."""
        now = time.monotonic()
        with self._cond:
            first = Delivery(message, 1, delay_s, follow_up=follow_up, generation=self._generation)
            if delay_s <= 0 and not self._stopping:
                # Due now: straight to a sender thread, without waking the dispatcher.
                self._by_task.setdefault(message.task_id, []).append(first)
                self._pool.submit(self._attempt, first)
            else:
                self._add(first, now + delay_s)
            if duplicate:
                second = Delivery(message, 2, delay_s, generation=self._generation)
                self._add(second, now + delay_s + DUPLICATE_GAP_S)

    def deliveries(self, task_id: str) -> list[dict[str, object]]:
        """Every delivery made or planned for a task."""
        with self._cond:
            return [d.as_dict() for d in self._by_task.get(task_id, [])]

    def counts(self, task_id: str) -> tuple[int, int]:
        """(HTTP attempts made, deliveries acknowledged) for a task."""
        with self._cond:
            chain = self._by_task.get(task_id, [])
            attempted = sum(len(d.attempts) for d in chain)
            return attempted, sum(1 for d in chain if d.state == "acknowledged")

    def pending(self) -> int:
        """Deliveries not yet acknowledged or given up."""
        with self._cond:
            return sum(1 for chain in self._by_task.values() for d in chain if d.state == "pending")

    # --- internals ----------------------------------------------------------------------

    def _add(self, delivery: Delivery, due: float) -> None:
        self._by_task.setdefault(delivery.message.task_id, []).append(delivery)
        self._push(delivery, due)

    def _push(self, delivery: Delivery, due: float) -> None:
        heapq.heappush(self._heap, (due, next(self._counter), delivery))
        self._cond.notify_all()

    def _dispatch(self) -> None:
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    _, _, delivery = heapq.heappop(self._heap)
                    self._pool.submit(self._attempt, delivery)
                timeout = self._heap[0][0] - now if self._heap else None
                self._cond.wait(timeout)

    def _attempt(self, delivery: Delivery) -> None:
        settings = self._settings()
        message = delivery.message
        sent_at = time.time()
        timestamp = int(sent_at) - (STALE_SKEW_S if message.stale_timestamp else 0)
        secret = settings.secret
        if message.bad_signature:
            # Still a well-formed "v3,<64 hex>", just computed with the wrong key.
            secret = secret + "-not-the-secret"
        attempt = Attempt(
            number=len(delivery.attempts) + 1,
            sent_at=sent_at,
            webhook_timestamp=timestamp,
            signature=signing.sign(secret, message.webhook_id, timestamp, message.body),
        )
        headers = {
            "content-type": "application/json",
            "webhook-id": message.webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": attempt.signature,
            "user-agent": "wavespeed-sim-webhook/1.0",
        }
        try:
            attempt.status_code = self._http.post(
                message.url, message.body, headers, settings.timeout_s
            )
        except (OSError, HTTPException, ValueError) as exc:
            attempt.error = f"{type(exc).__name__}: {exc}"
        attempt.duration_s = time.time() - sent_at
        ok = attempt.status_code is not None and 200 <= attempt.status_code < 300
        with self._cond:
            delivery.attempts.append(attempt)
            if delivery.generation != self._generation:
                return  # the simulator was reset while this attempt was on the wire
            if ok or len(delivery.attempts) > settings.retries or self._stopping:
                delivery.state = "acknowledged" if ok else "given_up"
                if delivery.follow_up is not None and not self._stopping:
                    follow = Delivery(delivery.follow_up, 1, 0.0, generation=self._generation)
                    self._add(follow, time.monotonic() + FOLLOW_UP_GAP_S)
                return
            backoff = settings.retry_base_s * 2 ** (len(delivery.attempts) - 1)
            self._push(delivery, time.monotonic() + backoff)
