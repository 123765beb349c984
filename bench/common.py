"""What every scenario shares: the result row, a private Redis, timing helpers."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from worker.stack import Stack, StackConfig


@dataclass(frozen=True)
class Row:
    """One measured line of the report."""

    scenario: str
    metric: str
    ours: float
    baseline: float
    unit: str
    goal: str  # e.g. ">= 10x"
    ratio: float
    met: bool
    note: str = ""

    @classmethod
    def higher_is_better(
        cls, scenario: str, metric: str, ours: float, baseline: float, unit: str, goal_ratio: float,
        note: str = "",
    ) -> Row:  # fmt: skip
        ratio = ours / baseline if baseline else float("inf")
        return cls(
            scenario, metric, ours, baseline, unit, f">= {goal_ratio:g}x", ratio,
            ratio >= goal_ratio, note,
        )  # fmt: skip


@contextmanager
def private_redis() -> Iterator[str]:
    """A throwaway redis-server on a free port (the same launcher `kq up` uses)."""
    with tempfile.TemporaryDirectory(prefix="kq-bench-") as tmp:
        config = StackConfig(
            var_dir=Path(tmp),
            wavespeed_api_key="bench-unused",
            start_receiver=False,
            start_worker=False,
            start_beat=False,
        )
        with Stack(config, announce=lambda line: None) as stack:
            yield stack.redis_url
