"""The submit and polling use cases against the real simulator (in-process, over HTTP)
and a private Redis, with a clock the test controls: deadlines, ambiguous submits,
redelivery, provider rejections. The Celery side is exercised in test_e2e.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from tests.support import Clock
from wavespeed_sim.server import SimServer
from worker import keys
from worker.domain import EditRequest, JobState, Prediction, TransitionOutcome
from worker.poller import sweep
from worker.service import (
    Deps,
    SubmitOutcome,
    Verifying,
    apply_webhook,
    cancel_job,
    mark_ambiguous,
    submit_job,
    submit_watchdog_s,
)
from worker.settings import Settings
from worker.store import JobStore
from worker.wavespeed import WaveSpeedClient

REQ = EditRequest(prompt="make it blue", image="https://example.com/a.jpg")


@pytest.fixture
def deps(sim: SimServer, store: JobStore, settings: Settings) -> Iterator[Deps]:
    client = WaveSpeedClient(sim.url, "sim-key", timeout_s=5)
    requeued: list[str] = []
    yield Deps(
        store=store,
        provider=client,
        settings=replace(settings, wavespeed_base_url=sim.url, job_deadline_s=600),
        clock=Clock(),
        enqueue_submit=requeued.append,
    )
    client.close()


def sim_tasks(control: httpx.Client) -> list[dict[str, Any]]:
    data = control.get("/_sim/tasks").json()
    return list(data["tasks"] if isinstance(data, dict) else data)


def submits(control: httpx.Client) -> list[dict[str, Any]]:
    data = control.get("/_sim/requests").json()
    entries = data["requests"] if isinstance(data, dict) else data
    return [r for r in entries if r.get("kind") == "submit"]


def queued_job(store: JobStore, job_id: str = "job1") -> str:
    assert store.create(job_id, REQ, now=time.time())
    return job_id


def test_submit_records_prediction_and_schedules_poll(
    deps: Deps, control: httpx.Client, store: JobStore
) -> None:
    """A submit moves the job to submitted with the provider's id and a poll time."""
    job_id = queued_job(store)
    result = submit_job(deps, job_id)
    assert result.outcome is SubmitOutcome.SUBMITTED
    job = store.get(job_id)
    (task,) = sim_tasks(control)
    assert job is not None and job.state is JobState.SUBMITTED
    assert job.prediction_id == task["id"] and job.attempts == 1
    assert "job=job1" in task["webhook"] and "t=" in task["webhook"]
    assert store.redis.zscore(keys.POLL, job_id) is not None


def test_submitted_or_terminal_jobs_are_never_resubmitted(
    deps: Deps, control: httpx.Client, store: JobStore
) -> None:
    """A redelivered task for a job with a prediction id does not POST again."""
    job_id = queued_job(store)
    submit_job(deps, job_id)
    for _ in range(3):
        assert submit_job(deps, job_id).outcome is SubmitOutcome.SKIPPED
    assert len(submits(control)) == 1


def test_poller_resolves_and_deadline_fails(
    deps: Deps, control: httpx.Client, store: JobStore
) -> None:
    """A due job is polled to completion; one that outlives the deadline fails `deadline`."""
    assert isinstance(deps.clock, Clock)
    done = queued_job(store, "done")
    submit_job(deps, done)
    # Let the first task finish before inference slows down (the simulator times a task
    # when it starts running, which a busy machine can delay past the config change).
    deadline = time.monotonic() + 10
    while any(t["status"] != "completed" for t in sim_tasks(control)):
        assert time.monotonic() < deadline, "the simulator never finished the first task"
        time.sleep(0.02)
    control.post("/_sim/config", json={"inference_time_s": 3600}).raise_for_status()
    slow = queued_job(store, "slow")
    submit_job(deps, slow)
    deps.clock.advance(deps.settings.poll_after_s + 1)
    report = sweep(deps)
    assert report.claimed == 2
    done_job = store.get(done)
    assert done_job is not None and done_job.state is JobState.COMPLETED
    assert done_job.resolved_by == "poll"
    slow_job = store.get(slow)
    assert slow_job is not None and slow_job.state is JobState.SUBMITTED
    deps.clock.advance(deps.settings.job_deadline_s)
    sweep(deps)
    slow_job = store.get(slow)
    assert slow_job is not None and slow_job.state is JobState.FAILED
    assert slow_job.reason == "deadline" and slow_job.resolved_by == "poll"
    states = {f["job_id"]: f["state"] for _, f in store.events()}
    assert states == {"done": "completed", "slow": "failed"}
    # Best effort: the provider was asked to drop the task we gave up on.
    (slow_task,) = [t for t in sim_tasks(control) if t["id"] == slow_job.prediction_id]
    assert slow_task["status"] == "deleted"


def test_a_sweep_only_touches_due_jobs(deps: Deps, control: httpx.Client, store: JobStore) -> None:
    """Jobs not yet due are not polled: no provider call, nothing claimed."""
    job_id = queued_job(store)
    submit_job(deps, job_id)
    before = len(control.get("/_sim/requests").json()["requests"])
    assert sweep(deps).claimed == 0
    assert len(control.get("/_sim/requests").json()["requests"]) == before


def test_provider_rejection_fails_with_its_message(
    deps: Deps, control: httpx.Client, store: JobStore
) -> None:
    """A permanent error (402, insufficient balance) fails the job with the provider's words."""
    control.post("/_sim/config", json={"balance": 0.0}).raise_for_status()
    job_id = queued_job(store)
    result = submit_job(deps, job_id)
    assert result.outcome is SubmitOutcome.FAILED
    job = store.get(job_id)
    assert job is not None and job.state is JobState.FAILED
    assert job.reason == "submit_rejected" and "402" in job.error
    assert sim_tasks(control) == []
    assert len(store.events()) == 1


def test_transient_error_requeues_and_final_attempt_fails(
    deps: Deps, control: httpx.Client, store: JobStore
) -> None:
    """5xx puts the job back to queued for a retry; on the last attempt it fails."""
    control.post("/_sim/config", json={"submit_5xx_rate": 1.0}).raise_for_status()
    job_id = queued_job(store)
    assert submit_job(deps, job_id).outcome is SubmitOutcome.RETRY
    job = store.get(job_id)
    assert job is not None and job.state is JobState.QUEUED and job.attempts == 1
    assert submit_job(deps, job_id, final_attempt=True).outcome is SubmitOutcome.FAILED
    job = store.get(job_id)
    assert job is not None and job.reason == "submit_retries_exhausted"


def test_ambiguous_submit_is_reconciled_without_paying_twice(
    deps: Deps, control: httpx.Client, store: JobStore
) -> None:
    """A submit whose answer is lost is found in the list call and adopted; one task only."""
    assert isinstance(deps.clock, Clock)
    control.post("/_sim/config", json={"ambiguous_submit_rate": 1.0}).raise_for_status()
    job_id = queued_job(store)
    assert submit_job(deps, job_id).outcome is SubmitOutcome.AMBIGUOUS
    job = store.get(job_id)
    assert job is not None and job.state is JobState.SUBMITTING and job.ambiguous
    control.post("/_sim/config", json={"ambiguous_submit_rate": 0.0}).raise_for_status()
    # A redelivered submit task now must not POST again either.
    assert submit_job(deps, job_id).outcome is SubmitOutcome.SKIPPED
    deps.clock.advance(15)
    sweep(deps)
    (task,) = sim_tasks(control)
    job = store.get(job_id)
    assert job is not None and job.prediction_id == task["id"]
    assert job.state in (JobState.SUBMITTED, JobState.COMPLETED)
    assert len(submits(control)) == 1


def test_ambiguous_submit_that_created_nothing_is_requeued_after_grace(
    deps: Deps, control: httpx.Client, store: JobStore
) -> None:
    """A job left `submitting` by a crash before its POST landed is queued again, once."""
    assert isinstance(deps.clock, Clock)
    job_id = queued_job(store)
    now = deps.clock()
    store.transition(job_id, JobState.SUBMITTING, now=now, fields={"submitting_at": now})
    # A duplicate message while the first attempt may still be posting: hands off.
    assert submit_job(deps, job_id).outcome is SubmitOutcome.SKIPPED
    # The redelivery after the crash: past the watchdog, the submit is ambiguous.
    deps.clock.advance(submit_watchdog_s(deps.settings) + 1)
    assert submit_job(deps, job_id).outcome is SubmitOutcome.AMBIGUOUS
    deps.clock.advance(15)
    sweep(deps)
    job = store.get(job_id)
    assert job is not None and job.state is JobState.SUBMITTING  # still within the grace
    deps.clock.advance(deps.settings.ambiguous_grace_s - submit_watchdog_s(deps.settings))
    sweep(deps)
    job = store.get(job_id)
    assert job is not None and job.state is JobState.QUEUED and not job.ambiguous
    assert submits(control) == []
    assert submit_job(deps, job_id).outcome is SubmitOutcome.SUBMITTED
    assert len(sim_tasks(control)) == 1


class _SubmitLandsFirst(JobStore):
    """A store on which the worker's record of the prediction id lands just before a
    cancel's move: the interleaving where a cancel read the job one step too early."""

    def __init__(self, base: JobStore, prediction_id: str) -> None:
        super().__init__(base.redis, result_ttl_s=base.result_ttl_s, events_maxlen=10_000)
        self.prediction_id = prediction_id

    def transition(self, job_id: str, target: JobState, **kw: Any) -> Any:
        if target is JobState.CANCELLED and self.prediction_id:
            pid, self.prediction_id = self.prediction_id, ""
            now = kw["now"]
            super().transition(
                job_id,
                JobState.SUBMITTED,
                now=now,
                fields={"prediction_id": pid, "submitted_at": now},
                expect_prediction_id=pid,
            )
        return super().transition(job_id, target, **kw)


def test_cancel_racing_the_submit_record_still_deletes_the_task(
    deps: Deps, control: httpx.Client, store: JobStore
) -> None:
    """A job that moves submitting -> submitted while it is being cancelled is cancelled
    and its task deleted at the provider (nothing runs, or bills, for a cancelled job)."""
    job_id = queued_job(store)
    control.post("/_sim/config", json={"inference_time_s": 3600}).raise_for_status()
    task = deps.provider.submit(REQ, webhook_url=None)
    store.transition(job_id, JobState.SUBMITTING, now=deps.clock(), fields={"attempts": 1})
    racing = replace(deps, store=_SubmitLandsFirst(store, task.id))
    assert cancel_job(racing, job_id).applied
    job = store.get(job_id)
    assert job is not None and job.state is JobState.CANCELLED and job.prediction_id == task.id
    (sim_task,) = [t for t in sim_tasks(control) if t["id"] == task.id]
    assert sim_task["status"] == "deleted"


def test_marking_ambiguous_never_touches_a_job_that_moved_on(deps: Deps, store: JobStore) -> None:
    """A lost submit answer arriving after the webhook finished the job leaves the job as
    the webhook left it: the flag is one compare-and-set on `submitting`."""
    job_id = queued_job(store)
    store.transition(job_id, JobState.SUBMITTING, now=deps.clock(), fields={"attempts": 1})
    store.transition(job_id, JobState.FAILED, now=deps.clock(), fields={"reason": "nsfw"})
    before = store.get(job_id)
    assert mark_ambiguous(deps, job_id, "read timeout").outcome is TransitionOutcome.REJECTED
    after = store.get(job_id)
    assert after == before and after is not None and not after.ambiguous


def test_a_failed_webhook_is_confirmed_by_the_provider_before_it_ends_the_job(
    deps: Deps, control: httpx.Client, store: JobStore
) -> None:
    """`make chaos --seed 5`: every delivery of a task's "completed" was lost and the
    contradictory late "failed" came through. A reported failure is checked with a GET
    first, so the job completes with its task's outputs instead of failing."""
    job_id = queued_job(store)
    submit_job(deps, job_id)
    job = store.get(job_id)
    assert job is not None and job.prediction_id
    wait_until_completed = time.monotonic() + 10
    while any(t["status"] != "completed" for t in sim_tasks(control)):
        assert time.monotonic() < wait_until_completed
        time.sleep(0.02)
    late_failed = Prediction.from_json(
        {"id": job.prediction_id, "status": "failed", "error": "contradictory", "outputs": []}
    )
    answer = apply_webhook(deps, job_id, late_failed, "late-failed-1")
    assert isinstance(answer, Verifying)
    assert store.get(job_id).state is JobState.SUBMITTED  # type: ignore[union-attr]
    sweep(deps)  # due at once
    done = store.get(job_id)
    assert done is not None and done.state is JobState.COMPLETED and done.outputs
    (task,) = sim_tasks(control)
    assert list(done.outputs) == task["outputs"]
