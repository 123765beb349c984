"""Seeded fault decisions: one ``random.Random(seed)`` behind every random choice.

Each submit draws the same number of numbers whatever the rates are (4 for the submit
itself, then 9 more if a task is created), so one ``--seed`` and the same sequence of
submits give the same faults even when a test changes one rate: changing
``drop_webhook_rate`` does not shift which tasks fail. Ids are deliberately not drawn
from here (see ``state.new_id``). Task times come from a second stream of the same seed,
so spreading them (``inference_jitter_s``) shifts no fault either.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from wavespeed_sim.config import SimConfig
from wavespeed_sim.state import TaskFaults

SUBMIT_5XX_CODES = (500, 502, 503)


@dataclass(frozen=True)
class Refusal:
    """A submit refused by an injected fault: no task, no charge."""

    status: int
    message: str
    fault: str
    retry_after_s: float | None = None


class FaultDice:
    """The seeded random source of every fault."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._timing = random.Random(f"timing:{seed}")

    def submit_refusal(self, cfg: SimConfig) -> Refusal | None:
        """Whether an injected 400, 5xx or 429 refuses this submit (always 4 draws)."""
        rng = self._rng
        roll_5xx, code_5xx, roll_429 = rng.random(), rng.choice(SUBMIT_5XX_CODES), rng.random()
        roll_400 = rng.random()
        if roll_400 < cfg.submit_400_rate:
            # A rule the provider enforces that a client cannot check up front.
            return Refusal(400, "image: the source image was rejected (simulated)", "submit_400")
        if roll_5xx < cfg.submit_5xx_rate:
            return Refusal(code_5xx, "upstream error (simulated)", "submit_5xx")
        if roll_429 < cfg.submit_429_rate:
            return Refusal(429, "too many requests (simulated)", "submit_429", 1.0)
        return None

    def task_timing(self) -> float:
        """Where a new task's processing time falls within +-inference_jitter_s: -1 to 1."""
        return self._timing.uniform(-1.0, 1.0)

    def task_faults(self, cfg: SimConfig, *, has_webhook: bool) -> TaskFaults:
        """The faults of a new task (always 9 draws)."""
        rng = self._rng
        rolls = [rng.random() for _ in range(8)]
        code = rng.choice(cfg.fail_codes)
        failed = rolls[0] < cfg.fail_rate
        hook = has_webhook  # webhook faults of a task without a webhook would be noise
        delayed = hook and rolls[3] < cfg.delay_webhook_rate
        return TaskFaults(
            fail_code=code if failed else None,
            drop_webhook=hook and rolls[1] < cfg.drop_webhook_rate,
            duplicate_webhook=hook and rolls[2] < cfg.duplicate_webhook_rate,
            delay_webhook_s=cfg.delay_webhook_s if delayed else 0.0,
            late_failed=hook and not failed and rolls[4] < cfg.late_failed_rate,
            bad_signature=hook and rolls[5] < cfg.bad_signature_rate,
            stale_timestamp=hook and rolls[6] < cfg.stale_timestamp_rate,
            ambiguous_submit=rolls[7] < cfg.ambiguous_submit_rate,
        )
