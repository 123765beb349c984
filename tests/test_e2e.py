"""End to end on real parts: private redis-server, the simulator, the receiver under
gunicorn, a Celery worker and beat, all as separate processes started by `Stack`.

One stack serves the module; each test patches the simulator's fault knobs and
resets them afterwards. Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kq.stack import Stack
from tests.conftest import wait_for
from tests.support import fast_stack
from worker import runtime
from worker.celery_app import configure
from worker.domain import Job, JobState
from worker.runtime import make_producer
from worker.settings import Settings
from worker.signing import job_token, sign_v3
from worker.store import JobStore
from worker.tasks import enqueue_submit

pytestmark = pytest.mark.integration

IMAGE = "https://example.com/source.jpg"


class Harness:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.settings = Settings.from_env({**os.environ, **stack.env})
        configure(self.settings)
        self.store: JobStore = runtime.make_store(self.settings)
        self.producer = make_producer(self.settings)
        assert stack.sim_url is not None
        self.sim = httpx.Client(base_url=stack.sim_url, timeout=10)

    def sim_config(self, **knobs: Any) -> None:
        self.sim.post("/_sim/config", json=knobs).raise_for_status()

    def sim_tasks(self) -> list[dict[str, Any]]:
        data = self.sim.get("/_sim/tasks").json()
        return list(data["tasks"] if isinstance(data, dict) else data)

    def sim_requests(self) -> list[dict[str, Any]]:
        data = self.sim.get("/_sim/requests").json()
        return list(data["requests"] if isinstance(data, dict) else data)

    def tasks_for(self, job_id: str) -> list[dict[str, Any]]:
        return [t for t in self.sim_tasks() if f"job={job_id}" in (t.get("webhook") or "")]

    def enqueue(self, prompt: str = "make it blue", **extra: Any) -> str:
        return self.producer.enqueue({"prompt": prompt, "image": IMAGE, **extra})

    def wait_terminal(self, job_id: str, timeout_s: float = 30) -> Job:
        def done() -> Job | None:
            job = self.store.get(job_id)
            return job if job is not None and job.terminal else None

        job: Job = wait_for(done, timeout_s=timeout_s, interval_s=0.1)
        return job

    def events_for(self, job_id: str) -> list[dict[str, str]]:
        return [f for _, f in self.store.events() if f["job_id"] == job_id]


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with fast_stack(tmp_path_factory.mktemp("stack"), seed=11) as stack:
        harness = Harness(stack)
        yield harness
        # Closed here, not by the garbage collector in some later test (ResourceWarning).
        harness.sim.close()
        harness.store.redis.close()
        harness.producer.close()


@pytest.fixture
def h(harness: Harness) -> Iterator[Harness]:
    yield harness
    harness.sim.post("/_sim/config", json=QUIET_KNOBS)


QUIET_KNOBS = {
    "inference_time_s": 0.2,
    "drop_webhook_rate": 0.0,
    "duplicate_webhook_rate": 0.0,
    "late_failed_rate": 0.0,
    "fail_rate": 0.0,
    "submit_400_rate": 0.0,
    "submit_429_rate": 0.0,
    "submit_5xx_rate": 0.0,
    "burst_429_s": 0.0,
    "burst_5xx_s": 0.0,
}


def test_happy_path_through_webhook(h: Harness) -> None:
    """A job is submitted, completed by the signed webhook, with one event and the sim's outputs."""
    job_id = h.enqueue(seed=3, aspect_ratio="16:9")
    job = h.wait_terminal(job_id)
    assert job.state is JobState.COMPLETED
    assert job.resolved_by == "webhook"
    (task,) = h.tasks_for(job_id)
    assert task["id"] == job.prediction_id
    assert list(job.outputs) == task["outputs"]
    assert httpx.get(job.outputs[0]).headers["content-type"].startswith("image/jpeg")
    (event,) = h.events_for(job_id)
    assert event["state"] == "completed" and json.loads(event["outputs"]) == task["outputs"]


def test_lost_webhook_is_resolved_by_the_poller(h: Harness) -> None:
    """With every delivery dropped, the polling fallback completes the job."""
    h.sim_config(drop_webhook_rate=1.0)
    job_id = h.enqueue()
    job = h.wait_terminal(job_id)
    assert job.state is JobState.COMPLETED and job.resolved_by == "poll"
    assert len(h.events_for(job_id)) == 1
    polls = [r for r in h.sim_requests() if job.prediction_id in r.get("path", "")]
    times = sorted(r["time"] for r in polls)
    assert all(b - a >= 1.9 for a, b in itertools.pairwise(times)), times


def test_duplicate_deliveries_give_one_event(h: Harness) -> None:
    """The same delivery twice (and the poller racing it) yields exactly one event."""
    h.sim_config(duplicate_webhook_rate=1.0)
    ids = [h.enqueue(prompt=f"dup {i}") for i in range(5)]
    for job_id in ids:
        assert h.wait_terminal(job_id).state is JobState.COMPLETED
    wait_for(lambda: all(len(h.tasks_for(j)) == 1 for j in ids))
    for job_id in ids:
        assert len(h.events_for(job_id)) == 1


def test_failed_after_completed_changes_nothing(h: Harness) -> None:
    """A contradictory late `failed` delivery after `completed` is ignored."""
    h.sim_config(late_failed_rate=1.0)
    job_id = h.enqueue()
    job = h.wait_terminal(job_id)
    assert job.state is JobState.COMPLETED

    def late_failed_delivered() -> bool:
        (task,) = h.tasks_for(job_id)
        return int(task.get("deliveries_acknowledged", 0)) >= 2

    wait_for(late_failed_delivered, timeout_s=15)
    after = h.store.get(job_id)
    assert after is not None and after.state is JobState.COMPLETED
    assert after.version == job.version
    assert len(h.events_for(job_id)) == 1


def test_provider_task_failure_is_recorded_with_code(h: Harness) -> None:
    """A task that fails at the provider ends `failed` with its task code and reason."""
    h.sim_config(fail_rate=1.0, fail_codes=[1402])
    job_id = h.enqueue()
    job = h.wait_terminal(job_id)
    assert job.state is JobState.FAILED
    assert job.reason == "provider_failed" and job.task_code == 1402


def test_429_and_5xx_on_submit_are_retried(h: Harness) -> None:
    """Bursts of 429 and 503 on submit are retried with backoff; one task, job completes."""
    h.sim_config(burst_429_s=1.5)
    first = h.enqueue(prompt="after 429s")
    job = h.wait_terminal(first, timeout_s=40)
    assert job.state is JobState.COMPLETED and job.attempts >= 2
    h.sim_config(burst_5xx_s=1.5)
    second = h.enqueue(prompt="after 5xx")
    job2 = h.wait_terminal(second, timeout_s=40)
    assert job2.state is JobState.COMPLETED and job2.attempts >= 2
    assert len(h.tasks_for(first)) == 1 and len(h.tasks_for(second)) == 1


def test_400_on_submit_fails_the_job_with_the_providers_message(h: Harness) -> None:
    """A 400 is not retried: the job fails `submit_rejected` with the provider's words."""
    h.sim_config(submit_400_rate=1.0)
    job_id = h.enqueue()
    job = h.wait_terminal(job_id)
    assert job.state is JobState.FAILED and job.reason == "submit_rejected"
    assert "HTTP 400" in job.error and "source image was rejected" in job.error
    assert job.attempts == 1 and h.tasks_for(job_id) == []
    (event,) = h.events_for(job_id)
    assert event["reason"] == "submit_rejected"


def test_redelivered_submit_task_does_not_submit_twice(h: Harness) -> None:
    """The same submit message three times (a redelivery) creates exactly one task."""
    job_id = h.enqueue()
    enqueue_submit(job_id)
    enqueue_submit(job_id)
    job = h.wait_terminal(job_id)
    assert job.state is JobState.COMPLETED
    enqueue_submit(job_id)  # long after: the job is terminal
    wait_for(lambda: len(h.tasks_for(job_id)) >= 1)
    submits = [
        r
        for r in h.sim_requests()
        if r.get("kind") == "submit" and job_id in json.dumps(r.get("query", ""))
    ]
    assert len(h.tasks_for(job_id)) == 1
    assert len(submits) == 1


def test_cancel_after_submit_deletes_the_task_and_ignores_the_late_webhook(h: Harness) -> None:
    """A submitted job cancelled: provider task deleted, a late delivery is stale, one event."""
    h.sim_config(inference_time_s=30)
    job_id = h.enqueue(prompt="cancel me")

    def submitted() -> Job | None:
        job = h.store.get(job_id)
        return job if job is not None and job.prediction_id else None

    job: Job = wait_for(submitted)
    assert h.producer.cancel_job(job_id)
    (task,) = h.tasks_for(job_id)
    assert task["status"] == "deleted"
    # A late (forged-by-us but correctly signed) completed delivery changes nothing.
    secret = h.sim.get("/api/v3/webhook/secret", headers={"Authorization": "Bearer x"})
    body = json.dumps(
        {"id": job.prediction_id, "status": "completed", "outputs": ["https://o/x.jpeg"]}
    ).encode()
    ts = str(int(time.time()))
    answer = httpx.post(
        f"{h.stack.receiver_url}/webhooks/wavespeed",
        params={"job": job_id, "t": job_token(h.settings.secret_key, job_id)},
        content=body,
        headers={
            "webhook-id": "late" + "0" * 28,
            "webhook-timestamp": ts,
            "webhook-signature": sign_v3(
                secret.json()["data"]["secret"], "late" + "0" * 28, ts, body
            ),
        },
    )
    assert answer.status_code == 200 and answer.json()["result"] == "stale"
    final = h.store.get(job_id)
    assert final is not None and final.state is JobState.CANCELLED
    assert [e["state"] for e in h.events_for(job_id)] == ["cancelled"]


def test_budget_stops_submitting_and_fails_the_rest(h: Harness) -> None:
    """A $0.24 budget on 6 jobs: 3 are submitted, 3 fail with reason `budget`."""
    receipt = h.producer.enqueue_batch(
        [{"prompt": f"budget {i}", "image": IMAGE} for i in range(6)], budget_usd=0.24
    )
    progress = h.producer.wait_batch(receipt.batch_id, timeout_s=30)
    assert progress is not None and progress.done
    jobs = h.producer.batch_jobs(receipt.batch_id)
    assert sorted(j.state.value for j in jobs) == ["completed"] * 3 + ["failed"] * 3
    assert {j.reason for j in jobs if j.state is JobState.FAILED} == {"budget"}
    assert progress.paid == 3 and progress.cost_usd == 0.24


def test_dead_letters_redrive_through_the_pipeline(h: Harness) -> None:
    """Provider failures land in the DLQ; redriving them (twice) completes one new job each."""
    h.sim_config(fail_rate=1.0, fail_codes=[5000])
    failed = [h.enqueue(prompt=f"dlq {i}") for i in range(2)]
    for job_id in failed:
        assert h.wait_terminal(job_id).reason == "provider_failed"
    letters = {j.id for j in h.producer.dead_letters(limit=1000)}
    assert set(failed) <= letters
    h.sim_config(fail_rate=0.0)
    first = h.producer.redrive(failed)
    assert h.producer.redrive(failed) == first  # idempotent: the same new jobs
    for new_id in first.values():
        assert h.wait_terminal(new_id).state is JobState.COMPLETED
    assert not set(failed) & {j.id for j in h.producer.dead_letters(limit=1000)}
    assert sum(len(h.tasks_for(n)) for n in first.values()) == 2


def test_ten_thousand_jobs_end_to_end(h: Harness) -> None:
    """10,000 jobs through enqueue, submit, webhook/poll: all terminal, one event each."""
    h.sim_config(inference_time_s=0.0, drop_webhook_rate=0.05)
    n = 10_000
    receipt = h.producer.enqueue_batch(
        ({"prompt": f"bulk {i}", "image": IMAGE} for i in range(n)), batch_id="bulk-10k"
    )
    assert receipt.created == n
    progress = h.producer.wait_batch("bulk-10k", timeout_s=420)
    assert progress is not None and progress.done, progress
    assert progress.completed == n
    ids = set(h.store.batch_members("bulk-10k"))
    events = [f for _, f in h.store.events() if f["batch_id"] == "bulk-10k"]
    assert len(events) == n and {e["job_id"] for e in events} == ids
    tasks = [t for t in h.sim_tasks() if "bulk " in json.dumps(t.get("params", {}))]
    assert len(tasks) == n


def test_enqueue_a_local_image_through_the_cli(h: Harness, tmp_path: Path) -> None:
    """`kq enqueue --image FILE` uploads the file, then the job completes with it as input."""
    import subprocess
    import sys

    from PIL import Image

    picture = tmp_path / "cat.png"
    Image.new("RGB", (32, 24), (200, 120, 40)).save(picture)
    result = subprocess.run(
        [sys.executable, "-m", "kq.cli", "enqueue", "--prompt", "make it blue",
         "--image", str(picture), "--wait", "--timeout", "60", "--json"],
        env={**os.environ, **h.stack.env},
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["state"] == "completed"
    assert job["request"]["image"].startswith(h.stack.sim_url or "-")
    assert httpx.get(job["request"]["image"]).content == picture.read_bytes()
