"""What a producer gets back: a batch receipt, a batch's progress, a job as JSON."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from worker.domain import (
    PRICE_PER_IMAGE_MICROS,
    Job,
)


@dataclass(frozen=True)
class BatchReceipt:
    """What an enqueue did: jobs written now, jobs that already existed (same key),
    and how many of those were still queued and were sent to the workers again.
    `job_ids`, when asked for: the job of each item, in the order of the items."""

    batch_id: str
    created: int
    existing: int
    resent: int
    job_ids: tuple[str, ...] | None = None

    @property
    def total(self) -> int:
        return self.created + self.existing

    def as_dict(self) -> dict[str, object]:
        data: dict[str, object] = {
            "batch_id": self.batch_id,
            "created": self.created,
            "existing": self.existing,
            "resent": self.resent,
            "total": self.total,
        }
        if self.job_ids is not None:
            data["job_ids"] = list(self.job_ids)
        return data


def job_json(job: Job) -> dict[str, Any]:
    """A job as the product serves it in JSON (`kq job --json`, the HTTP API): numbers as
    numbers, times as unix seconds or null when not (yet) known, `seconds` end to end."""
    data = asdict(job)
    data["state"] = job.state.value
    data["outputs"] = list(job.outputs)
    data["candidates"] = list(job.candidates)
    data.pop("candidates_seen", None)  # reconciliation's bookkeeping, not part of the job
    data["metadata"] = None if job.metadata is None else dict(job.metadata)
    for name in ("created_at", "submitting_at", "submitted_at", "finished_at"):
        data[name] = data[name] or None
    data["candidates_final_at"] = job.candidates_final_at or None
    data["seconds"] = job.seconds
    return data


@dataclass(frozen=True)
class BatchProgress:
    """A batch's counters, cost and pace at one moment."""

    batch_id: str
    total: int
    queued: int
    in_flight: int
    completed: int
    failed: int
    cancelled: int
    paid: int
    budget_usd: float | None
    created_at: float
    now: float
    last_finished_at: float = 0.0
    # The mean price of the batch's jobs (each at its model's price; models.average_price_micros).
    price_micros: int = PRICE_PER_IMAGE_MICROS
    # What the paid tasks with a price on their record cost, each at its model's price, and
    # how many those are (the others, written before prices rode on records: mean price).
    paid_micros: int = 0
    paid_priced: int = 0

    @property
    def terminal(self) -> int:
        return self.completed + self.failed + self.cancelled

    @property
    def done(self) -> bool:
        return self.total > 0 and self.terminal >= self.total

    @property
    def cost_usd(self) -> float:
        unpriced = max(0, self.paid - self.paid_priced)
        return round((self.paid_micros + unpriced * self.price_micros) / 1_000_000, 2)

    @property
    def rate_per_s(self) -> float:
        """Jobs finished per second since the batch was created (until its last one)."""
        end = self.last_finished_at if self.done and self.last_finished_at else self.now
        elapsed = end - self.created_at
        return self.terminal / elapsed if elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        remaining = self.total - self.terminal
        if remaining <= 0:
            return 0.0
        rate = self.rate_per_s
        return remaining / rate if rate > 0 else None

    def as_dict(self) -> dict[str, object]:
        eta = self.eta_s
        return {
            "batch_id": self.batch_id,
            "total": self.total,
            "queued": self.queued,
            "in_flight": self.in_flight,
            "completed": self.completed,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "paid_submits": self.paid,
            "cost_usd": self.cost_usd,
            "budget_usd": self.budget_usd,
            "rate_per_s": round(self.rate_per_s, 3),
            "eta_s": None if eta is None or math.isinf(eta) else round(eta, 1),
            "done": self.done,
        }


def spent_micros(counts: Mapping[str, int], mean_price_micros: float) -> float:
    """What paid tasks cost: each priced one at its own price (`paid_micros`, written by
    transition.lua), any other at `mean_price_micros`."""
    unpriced = max(0, counts.get("paid", 0) - counts.get("paid_priced", 0))
    return counts.get("paid_micros", 0) + unpriced * mean_price_micros
