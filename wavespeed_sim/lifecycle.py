"""The task lifecycle: ``created -> processing -> completed | failed``.

A task leaves the queue once its queue delay is over and fewer than ``concurrency``
tasks are processing (FIFO: the head of the queue waits for a free slot), and ends
``inference_time_s`` (+- its drawn share of ``inference_jitter_s``) later, failed with
its task code if it drew a failure at submit.
These functions only change tasks; the engine calls them under its lock from its
scheduler thread, then wakes sync-mode waiters and sends the webhooks of ended tasks.
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping

from wavespeed_sim.config import SimConfig
from wavespeed_sim.state import Task

MAX_IDLE_S = 0.5  # the scheduler re-checks at least this often, whatever it was told


def step(active: MutableMapping[str, Task], cfg: SimConfig, now: float) -> tuple[list[Task], float]:
    """Apply every transition due at ``now`` to the ``active`` tasks (in submit order).

    Ended tasks leave ``active``. Returns them, in the order they ended, and when the
    next transition is due.
    """
    ended: list[Task] = []
    wake = now + MAX_IDLE_S
    moved = True
    while moved:  # a task started with zero inference time ends in the same step
        moved = False
        processing = 0
        for task in list(active.values()):
            if task.status != "processing":
                continue
            assert task.finish_mono is not None
            if task.finish_mono <= now:
                finish(task, now)
                active.pop(task.id, None)
                ended.append(task)
            else:
                processing += 1
                wake = min(wake, task.finish_mono)
        for task in list(active.values()):
            if task.status != "created":
                continue
            if task.ready_mono > now:
                wake = min(wake, task.ready_mono)
                continue
            if cfg.concurrency and processing >= cfg.concurrency:
                break  # FIFO: the head of the queue waits for a free slot
            task.status = "processing"
            task.started_mono = now
            task.started_unix = time.time()
            inference_s = cfg.inference_time_s + task.timing * cfg.inference_jitter_s
            task.finish_mono = now + max(0.0, inference_s)
            processing += 1
            moved = moved or task.finish_mono <= now
            wake = min(wake, task.finish_mono)
    return ended, wake


def finish(task: Task, now: float) -> None:
    """End a processing task: completed with its output, or failed with its drawn code."""
    assert task.started_mono is not None
    task.execution_ms = round((now - task.started_mono) * 1000)
    task.finished_unix = time.time()
    if task.faults.fail_code is not None:
        task.fail(task.faults.fail_code)
    else:
        task.status = "completed"
        task.outputs = [f"{task.base_url}/outputs/{task.id}.jpeg"]
