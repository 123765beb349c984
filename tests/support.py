"""Helpers several test modules share: a controllable clock, a WSGI app served over real
HTTP in a thread, a quick local stack, and submitted jobs with their webhook bodies."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from werkzeug.serving import make_server

from kq.stack import Stack, StackConfig
from worker.domain import EditRequest, JobState
from worker.store import JobStore

PID = "0123456789abcdef0123456789abcdef"
REQ = EditRequest(prompt="make it blue", image="https://example.com/a.jpg")

# A simulator and stack tuned for tests: quick tasks, quick retries, quick polling.
FAST_STACK_ENV: Mapping[str, str] = {
    "KQ_POLL_AFTER_S": "1.5",
    "KQ_SWEEP_INTERVAL_S": "0.5",
    "KQ_SUBMIT_MAX_RETRIES": "8",
    "KQ_LOG_FORMAT": "json",
}


def fast_sim_args(seed: int) -> tuple[str, ...]:
    return (
        "--seed", str(seed),
        "--inference-time", "0.2",
        "--queue-delay", "0",
        "--webhook-retry-base", "0.2",
        "--webhook-timeout", "2",
    )  # fmt: skip


@contextmanager
def fast_stack(
    var_dir: Path,
    *,
    seed: int,
    worker_concurrency: int = 4,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[Stack]:
    """A whole local stack (redis, simulator, receiver, worker, beat) with test timings."""
    config = StackConfig(
        var_dir=var_dir,
        sim_args=fast_sim_args(seed),
        worker_concurrency=worker_concurrency,
        extra_env={**FAST_STACK_ENV, **(extra_env or {})},
    )
    with Stack(config, announce=lambda line: None) as stack:
        yield stack


class Clock:
    """Wall-clock time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@contextmanager
def serve_in_thread(app: Any, poll_interval_s: float = 0.5) -> Iterator[str]:
    """Serve a WSGI app on a free loopback port; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, args=(poll_interval_s,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def is_terminal(store: JobStore, job_id: str) -> bool:
    job = store.get(job_id)
    return job is not None and job.terminal


def make_submitted_job(store: JobStore, job_id: str = "job1", pid: str = PID) -> None:
    """A job in `submitted` with prediction `pid`, as the worker leaves it."""
    now = time.time()
    store.create(job_id, REQ, now=now)
    store.transition(job_id, JobState.SUBMITTING, now=now)
    store.transition(
        job_id,
        JobState.SUBMITTED,
        now=now,
        fields={"prediction_id": pid, "submitted_at": now},
        expect_prediction_id=pid,
    )


def prediction_body(pid: str = PID, status: str = "completed") -> bytes:
    """A webhook body as WaveSpeed sends it: the bare prediction, compact JSON."""
    pred = {
        "id": pid,
        "model": "wavespeed-ai/flux-kontext-max",
        "outputs": ["https://o.example/1.jpeg"] if status == "completed" else [],
        "status": status,
        "error": "" if status == "completed" else "boom",
        "has_nsfw_contents": [False],
    }
    return json.dumps(pred, separators=(",", ":")).encode()
