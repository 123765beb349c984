"""The simulator's engine: submits, the scheduler thread, queries, faults and control.

All state sits behind one re-entrant lock (``self._cond``). A scheduler thread moves tasks
``created -> processing -> completed | failed`` (the rules are in ``lifecycle.py``).
Ending a task hands its webhook to the ``Deliverer`` (lock order is always engine, then
deliverer; the deliverer never calls back into the engine).

Every random decision is drawn from ``FaultDice`` under the lock at submit time (see
``faults.py``), so the faults of a task are fixed, and visible in ``/_sim/tasks``, from
the moment it exists.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

from wavespeed_sim import lifecycle
from wavespeed_sim.config import SimConfig, new_webhook_secret
from wavespeed_sim.delivery import Deliverer, DeliverySettings, task_messages
from wavespeed_sim.faults import FaultDice
from wavespeed_sim.params import ListQuery, price_of
from wavespeed_sim.state import (
    RateLimiter,
    RequestLog,
    SimClock,
    Task,
    UploadStore,
    iso_ns,
    new_id,
)


def _micros(dollars: float) -> int:
    # Money is kept in integer micro-dollars: 1000 - 0.08 * n must not drift.
    return round(dollars * 1_000_000)


@dataclass(frozen=True)
class SubmitOutcome:
    """What a submit produced; the HTTP layer turns it into a response (or none)."""

    http_status: int
    message: str = "success"
    prediction: dict[str, object] | None = None
    task_id: str | None = None
    fault: str | None = None
    drop_connection: bool = False
    retry_after_s: float | None = None


class Simulator:
    """The whole simulated provider, minus HTTP."""

    def __init__(self, config: SimConfig) -> None:
        self._initial = config.resolved()
        self._cond = threading.Condition(threading.RLock())
        self.requests = RequestLog()
        self.clock = SimClock()
        self.uploads = UploadStore()
        self._stopping = False
        self._started_mono = time.monotonic()
        self._deliverer = Deliverer(self._delivery_settings, self._initial.webhook_workers)
        self._thread = threading.Thread(target=self._schedule, name="sim-scheduler", daemon=True)
        self._restore_initial()

    def _restore_initial(self) -> None:
        """Back to the state right after start (the config as given at start included)."""
        now = time.monotonic()
        self._config = self._initial
        assert self._initial.seed is not None  # resolved() always sets one
        self._dice = FaultDice(self._initial.seed)
        self._tasks: dict[str, Task] = {}
        self._active: dict[str, Task] = {}  # not yet final, in submit order (= queue order)
        self._balance = _micros(self._initial.balance)
        self._limiter = RateLimiter()
        self._seq = 0
        self._burst_429_until = now + self._initial.burst_429_s
        self._burst_5xx_until = now + self._initial.burst_5xx_s
        self.clock.reset()
        self.uploads.clear()

    # --- life of the simulator ----------------------------------------------------------

    @property
    def config(self) -> SimConfig:
        """The config in force now (start config plus runtime patches)."""
        return self._config

    def start(self) -> None:
        """Start the scheduler and the webhook sender."""
        self._deliverer.start()
        self._thread.start()

    def stop(self) -> None:
        """Stop both threads; requests waiting in sync mode are released."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        self._deliverer.stop()

    def reset(self) -> None:
        """Forget every task, upload, request and delivery; restore the start config."""
        with self._cond:
            self._deliverer.reset()
            self._restore_initial()
            self.requests.clear()
            self._cond.notify_all()

    def patch_config(self, patch: Mapping[str, object]) -> SimConfig:
        """Apply a runtime patch (raises ConfigError); returns the new config."""
        with self._cond:
            new = self._config.with_patch(patch)
            now = time.monotonic()
            if "seed" in patch:
                seed = new.seed if new.seed is not None else secrets.randbits(32)
                new = replace(new, seed=seed)
                self._dice = FaultDice(seed)
            if "webhook_secret" in patch and new.webhook_secret is None:
                new = replace(new, webhook_secret=new_webhook_secret())
            if "balance" in patch:
                self._balance = _micros(new.balance)  # sets the current balance
            if "burst_429_s" in patch:
                self._burst_429_until = now + new.burst_429_s
            if "burst_5xx_s" in patch:
                self._burst_5xx_until = now + new.burst_5xx_s
            self._config = new
            self._cond.notify_all()
            return new

    def advance_clock(self, seconds: float) -> dict[str, object]:
        """Move the sim clock forward (expiry and list filters follow it)."""
        with self._cond:
            self.clock.advance(seconds)
            return self.clock_info()

    def clock_info(self) -> dict[str, object]:
        """The sim clock now and its offset from real time."""
        return {"now": iso_ns(self.clock.now_ns()), "offset_s": self.clock.offset_s}

    # --- the provider's API -------------------------------------------------------------

    def submit(
        self, model: str, params: dict[str, object], webhook: str | None, base_url: str
    ) -> SubmitOutcome:
        """Create a task from validated params, or refuse as configured/limited."""
        with self._cond:
            cfg = self._config
            now = time.monotonic()
            refusal = self._dice.submit_refusal(cfg)  # drawn first: a fixed number per submit
            if now < self._burst_5xx_until:
                return SubmitOutcome(
                    503, "service unavailable (simulated burst)", fault="burst_5xx"
                )
            if now < self._burst_429_until:
                wait = self._burst_429_until - now
                return SubmitOutcome(
                    429,
                    "too many requests (simulated burst)",
                    fault="burst_429",
                    retry_after_s=wait,
                )
            if refusal is not None:
                return SubmitOutcome(
                    refusal.status,
                    refusal.message,
                    fault=refusal.fault,
                    retry_after_s=refusal.retry_after_s,
                )
            wait_s = self._limiter.check(now, cfg.rate_limit_per_minute)
            if wait_s is not None:
                return SubmitOutcome(
                    429,
                    f"rate limit exceeded: {cfg.rate_limit_per_minute} tasks per minute",
                    fault="rate_limit",
                    retry_after_s=wait_s,
                )
            price = _micros(price_of(model, cfg.price_per_image))  # each model's own price
            if self._balance < price:
                return SubmitOutcome(
                    402,
                    f"insufficient balance: ${self._balance / 1e6:.2f} left, "
                    f"${price / 1e6:.2f} needed per image",
                    fault="insufficient_balance",
                )
            faults = self._dice.task_faults(cfg, has_webhook=webhook is not None)
            self._limiter.record(now)
            self._balance -= price
            self._seq += 1
            task = Task(
                seq=self._seq,
                id=new_id(),
                model=model,
                params=params,
                webhook=webhook,
                base_url=base_url,
                created_ns=self.clock.now_ns(),
                charged=price / 1e6,
                faults=faults,
                ready_mono=now + cfg.queue_delay_s,
                timing=self._dice.task_timing(),
            )
            self._tasks[task.id] = task
            self._active[task.id] = task
            self._cond.notify_all()
            return SubmitOutcome(
                200,
                prediction=task.prediction(),
                task_id=task.id,
                fault="ambiguous_submit" if faults.ambiguous_submit else None,
                drop_connection=faults.ambiguous_submit,
            )

    def wait_final(self, task_id: str, timeout_s: float) -> dict[str, object]:
        """Block until the task ends (sync mode); after ``timeout_s`` answer code 5004."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            task = self._tasks[task_id]
            while not task.final and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            prediction = task.prediction()
            if not task.final:
                prediction["error"] = (
                    f"Sync mode timed out after {timeout_s:g} s; the task is still running"
                )
                prediction["code"] = 5004
            return prediction

    def _visible(self, task_id: str) -> Task | None:
        task = self._tasks.get(task_id)
        if task is None or task.removed or self._expired(task):
            return None
        return task

    def _expired(self, task: Task) -> bool:
        return self.clock.now_ns() - task.created_ns > self._config.retention_s * 1e9

    def get(self, task_id: str) -> dict[str, object] | None:
        """The prediction now, or None when unknown, deleted after its end, or expired."""
        with self._cond:
            task = self._visible(task_id)
            return None if task is None else task.prediction()

    def list_predictions(self, query: ListQuery) -> dict[str, object]:
        """One page of the visible predictions, newest first."""
        with self._cond:
            found = [
                task
                for task in self._tasks.values()
                if not task.removed
                and not self._expired(task)
                and (query.model is None or task.model == query.model)
                and (query.status is None or task.status == query.status)
                and (query.created_after_ns is None or task.created_ns >= query.created_after_ns)
                and (query.created_before_ns is None or task.created_ns <= query.created_before_ns)
            ]
            found.sort(key=lambda t: (t.created_ns, t.seq), reverse=True)
            start = (query.page - 1) * query.page_size
            page = found[start : start + query.page_size]
            return {
                "items": [task.prediction() for task in page],
                "page": query.page,
                "page_size": query.page_size,
                "total": len(found),
            }

    def delete(self, ids: list[str]) -> int:
        """Delete predictions; returns how many were deleted.

        A task that has not ended becomes ``deleted`` (a best-effort cancel: it stops, keeps
        its charge and sends no webhook). A task that has ended is removed: its result,
        list entry and outputs answer 404 from then on, as after expiry.
        """
        count = 0
        with self._cond:
            for task_id in dict.fromkeys(ids):
                task = self._visible(task_id)
                if task is None or task.status == "deleted":
                    continue
                if task.final:
                    task.removed = True
                else:
                    task.status = "deleted"
                    task.finished_unix = time.time()
                    self._active.pop(task.id, None)
                count += 1
            self._cond.notify_all()
        return count

    def balance(self) -> float:
        """The account balance in dollars."""
        with self._cond:
            return self._balance / 1e6

    def secret(self) -> str:
        """The webhook signing secret."""
        secret = self._config.webhook_secret
        assert secret is not None  # resolved() and patch_config() always set one
        return secret

    def output_prompt(self, task_id: str) -> str | None:
        """The prompt whose image is the task's output, if that output can be downloaded."""
        with self._cond:
            task = self._visible(task_id)
            return task.prompt if task is not None and task.status == "completed" else None

    def output_image(self, task_id: str) -> tuple[str, str | None] | None:
        """(prompt, aspect_ratio) drawn as the task's output, if it can be downloaded:
        None when unknown, not completed, deleted, or past the retention (404)."""
        with self._cond:
            task = self._visible(task_id)
            if task is None or task.status != "completed":
                return None
            ratio = task.params.get("aspect_ratio")
            return task.prompt, ratio if isinstance(ratio, str) else None

    # --- ground truth for tests ---------------------------------------------------------

    def tasks_snapshot(self, task_id: str | None = None) -> list[dict[str, object]]:
        """Every task (or one) with its faults and webhook deliveries."""
        with self._cond:
            chosen = list(self._tasks.values())
            if task_id is not None:
                chosen = [t for t in chosen if t.id == task_id]
            out = []
            for task in chosen:
                record = task.as_dict(expired=self._expired(task))
                deliveries = self._deliverer.deliveries(task.id)
                record["deliveries"] = deliveries
                attempted, acknowledged = self._deliverer.counts(task.id)
                record["deliveries_attempted"] = attempted
                record["deliveries_acknowledged"] = acknowledged
                out.append(record)
            return out

    def health(self) -> dict[str, object]:
        """A cheap liveness summary."""
        with self._cond:
            return {
                "ok": True,
                "uptime_s": round(time.monotonic() - self._started_mono, 3),
                "tasks": len(self._tasks),
                "active": len(self._active),
                "pending_deliveries": self._deliverer.pending(),
                "balance": self._balance / 1e6,
                "clock": self.clock_info(),
            }

    # --- the lifecycle ------------------------------------------------------------------

    def _delivery_settings(self) -> DeliverySettings:
        # Read without the lock on purpose: the deliverer must never take the engine's lock
        # (lock order), and swapping the frozen config is one atomic attribute store.
        cfg = self._config
        return DeliverySettings(
            secret=cfg.webhook_secret or "",
            timeout_s=cfg.webhook_timeout_s,
            retries=cfg.webhook_retries,
            retry_base_s=cfg.webhook_retry_base_s,
        )

    def _schedule(self) -> None:
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                ended, wake = lifecycle.step(self._active, self._config, now)
                if ended:
                    self._cond.notify_all()  # sync-mode waiters
                for task in ended:
                    self._send_webhook(task)
                self._cond.wait(max(0.0, min(wake - now, lifecycle.MAX_IDLE_S)))

    def _send_webhook(self, task: Task) -> None:
        if task.webhook is None or task.faults.drop_webhook:
            return
        message, follow_up = task_messages(task)
        self._deliverer.send(
            message,
            delay_s=task.faults.delay_webhook_s,
            duplicate=task.faults.duplicate_webhook,
            follow_up=follow_up,
        )
