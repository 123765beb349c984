"""Graceful shutdown (issue 14): what SIGTERM does to a worker and to a receiver.

- The worker, with the provider hanging: it stops taking messages, its chunks hand back
  the jobs they had not started, and it is gone within KQ_DRAIN_TIMEOUT_S (plus a small
  margin), not after every held submit ran into its HTTP timeout. Started again (and the
  provider back), every job ends terminal with one event, none paid twice.
- The receiver: a webhook request in flight when SIGTERM arrives still gets its answer
  (gunicorn's graceful timeout), and the receiver then exits.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from kq.stack import Stack, StackConfig
from tests.conftest import wait_for
from tests.support import FAST_STACK_ENV, fast_sim_args
from worker import runtime
from worker.celery_app import configure
from worker.domain import JobState
from worker.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

IMAGE = "https://example.com/source.jpg"
DRAIN_TIMEOUT_S = 3.0
# Longer than the drain timeout: without the bound, a held submit would wait this long.
HTTP_TIMEOUT_S = 20.0
# Exit within the drain timeout plus this (signal delivery, Celery's own shutdown steps).
DRAIN_MARGIN_S = 4.0
JOBS = 300  # three chunks of 100


def test_worker_drain_is_bounded_when_the_provider_hangs(tmp_path: Path) -> None:
    """SIGTERM while chunks are submitting to a provider that stopped answering: the
    worker hands back its unstarted jobs and exits within the drain timeout; restarted,
    it finishes every job exactly once."""
    env = {
        **FAST_STACK_ENV,
        "KQ_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
        "KQ_HTTP_TIMEOUT_S": str(HTTP_TIMEOUT_S),
        "KQ_AMBIGUOUS_GRACE_S": "3",
        "KQ_AMBIGUOUS_SETTLE_S": "6",
    }
    config = StackConfig(
        var_dir=tmp_path / "var",
        sim_args=fast_sim_args(51),
        worker_concurrency=4,
        extra_env=env,
        worker_stop_timeout_s=60,
    )
    with Stack(config, announce=lambda line: None) as stack:
        settings = Settings.from_env({**os.environ, **stack.env})
        configure(settings)
        store = runtime.make_store(settings)
        producer = runtime.make_producer(settings)
        items = [{"prompt": f"drain {i}", "image": IMAGE, "seed": i} for i in range(JOBS)]
        batch = producer.enqueue_batch(items)
        ids = store.batch_members(batch.batch_id)

        def started() -> int:
            return sum(1 for j in store.get_many(ids) if j and j.state is not JobState.QUEUED)

        wait_for(lambda: started() >= 40, timeout_s=60, interval_s=0.02)
        stack.kill("sim", signal.SIGSTOP)  # the provider hangs: held submits block
        try:
            time.sleep(0.5)  # let the chunks' threads reach the frozen provider
            worker = stack.procs["worker"]
            began = time.monotonic()
            stack.kill("worker", signal.SIGTERM)
            wait_for(lambda: worker.poll() is not None, timeout_s=DRAIN_TIMEOUT_S + 30)
            took = time.monotonic() - began
            log = worker.log_path.read_text(errors="replace")
            assert took <= DRAIN_TIMEOUT_S + DRAIN_MARGIN_S, (took, worker.tail())
            assert '"worker.drain_timeout"' in log, worker.tail()
            assert '"worker.drain_handed_back"' in log, worker.tail()
            assert worker.returncode == 0
        finally:
            stack.kill("sim", signal.SIGCONT)
        states = Counter(j.state.value if j else "missing" for j in store.get_many(ids))
        print(f"worker gone after {took:.1f} s (drain timeout {DRAIN_TIMEOUT_S:g} s): {states}")
        stack.restart("worker")

        def settled() -> bool:
            return all(j is not None and j.terminal for j in store.get_many(ids))

        wait_for(settled, timeout_s=240, interval_s=0.5)
        per_job = Counter(fields["job_id"] for _, fields in store.events())
        assert {j: per_job[j] for j in ids if per_job[j] != 1} == {}
        with httpx.Client(timeout=30, trust_env=False) as http:
            tasks = http.get(f"{stack.sim_url}/_sim/tasks").json()["tasks"]
        paid = Counter(t["params"]["prompt"] for t in tasks)
        assert [p for p, n in paid.items() if n > 1] == []
        store.redis.close()
        producer.close()


def test_receiver_answers_the_request_in_flight_on_sigterm(tmp_path: Path) -> None:
    """A webhook whose body is still arriving when the receiver gets SIGTERM is answered
    (here 401: it is unsigned), not cut off; then the receiver exits by itself."""
    config = StackConfig(
        var_dir=tmp_path / "var",
        sim_args=fast_sim_args(52),
        start_worker=False,
        start_beat=False,
        extra_env=FAST_STACK_ENV,
    )
    with Stack(config, announce=lambda line: None) as stack:
        parts = urlsplit(stack.receiver_url or "")
        body = b'{"id": "0123456789abcdef0123456789abcdef", "status": "completed"}'
        head = (
            f"POST /webhooks/wavespeed?job=j1&t=x HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        receiver = stack.procs["receiver"]
        with socket.create_connection((parts.hostname, parts.port), timeout=15) as conn:
            conn.sendall(head + body[:10])
            time.sleep(0.3)  # the request is being read by a gunicorn thread
            stack.kill("receiver", signal.SIGTERM)
            time.sleep(0.5)
            conn.sendall(body[10:])
            answer = conn.recv(4096)
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        wait_for(lambda: receiver.poll() is not None, timeout_s=20)
