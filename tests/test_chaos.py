"""Chaos on real processes: the small `make chaos` run, and the failures chaos runs
found, each pinned by its own minimal test.

The small run pushes ~180 jobs through a full stack (private Redis with AOF, the
simulator with seeded provider faults, gunicorn receiver, Celery worker, beat) while the
worker is killed -9 (once between a submit's POST and its recording, once anywhere),
the receiver, beat and Redis are restarted, the receiver's gunicorn workers are killed
during a webhook burst, a second beat runs and 429/5xx bursts hit the submits; every
invariant must hold (see `chaos.invariants`). It leaves out what only costs time: the
20 s Redis freeze, the 30 s provider queue of the held-submits kill, and the Redis
restart mid-submit. A worker kill makes the jobs its dispatcher had claimed wait for the
check of queued jobs (60 s) and their provider slot's lease, so the run takes ~80 s.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from chaos import ChaosConfig, run
from chaos.proxy import ProviderProxy
from kq.stack import Stack, StackConfig
from tests.conftest import wait_for
from tests.support import Clock
from wavespeed_sim.config import SimConfig
from wavespeed_sim.server import SimServer
from worker import poller, runtime
from worker.celery_app import configure
from worker.domain import EditRequest, JobState, ResolvedBy
from worker.poller import sweep
from worker.producer import Item, Producer
from worker.service import Deps, SubmitOutcome, apply_update, submit_job, submit_watchdog_s
from worker.settings import Settings
from worker.store import QUEUED_CHECK_S, JobStore
from worker.tasks import CHUNK_THREADS, enqueue_submits
from worker.wavespeed import WaveSpeedClient

REQ = EditRequest(prompt="make it blue", image="https://example.com/a.jpg")


@pytest.fixture
def proxy() -> Iterator[ProviderProxy]:
    server = ProviderProxy()
    server.start()
    yield server
    server.stop()


@pytest.mark.integration
def test_jobs_a_killed_worker_held_are_redelivered(proxy: ProviderProxy, tmp_path: Path) -> None:
    """A worker killed -9 with submit messages in hand (some jobs mid-POST, most not yet
    started) loses nothing: the messages come back after the visibility timeout, every
    job ends, and no job is paid twice."""
    config = StackConfig(
        var_dir=tmp_path,
        sim_args=("--seed", "3", "--inference-time", "0.1", "--webhook-retry-base", "0.2"),
        worker_concurrency=2,
        start_beat=False,  # nothing here needs polling: every webhook is delivered
        extra_env={"KQ_WAVESPEED_BASE_URL": proxy.url, "KQ_VISIBILITY_TIMEOUT_S": "3"},
    )
    with Stack(config, announce=lambda line: None) as stack:
        proxy.upstream = stack.sim_url
        settings = Settings.from_env({**os.environ, **stack.env})
        configure(settings)
        store = runtime.make_store(settings)
        producer = Producer(store=store, send=enqueue_submits)
        proxy.arm_hold(count=None)  # every submit's answer is held: the worker stalls
        items = [
            Item(EditRequest(prompt=f"held {i}", image="https://example.com/a.jpg"), f"h-{i}")
            for i in range(60)
        ]
        receipt = producer.enqueue_batch(items, batch_id="held")
        assert receipt.created == 60
        # Every submit thread blocked in a POST: none is between taking a provider slot
        # and claiming its job, a narrower window that costs a slot lease (reported).
        wait_for(lambda: proxy.held_count >= CHUNK_THREADS, timeout_s=20)
        stack.kill("worker")
        proxy.release()
        stack.restart("worker")
        ids = store.batch_members("held")

        def all_done() -> bool:
            return all(j is not None and j.terminal for j in store.get_many(ids))

        wait_for(all_done, timeout_s=40, interval_s=0.2)
        jobs = [j for j in store.get_many(ids) if j is not None]
        assert {j.state.value for j in jobs} == {"completed"}
        assert len({j.prediction_id for j in jobs}) == 60
        assert proxy.held_count < 60  # most jobs had not been submitted when it died
        tasks = httpx.get(f"{stack.sim_url}/_sim/tasks").json()["tasks"]
        assert len(tasks) == 60  # one paid task per job
        store.redis.close()


@pytest.mark.integration
def test_small_chaos_run_holds_every_invariant(tmp_path: Path) -> None:
    """~180 jobs under every provider fault and the process faults, worker kills
    included: all invariants hold."""
    result = run(ChaosConfig.small(var_dir=tmp_path), announce=lambda line: None)
    print(result.render())
    assert result.ok, result.render()


# --- found by chaos runs and fixed -------------------------------------------------------


def test_reconciliation_that_cannot_see_its_whole_window_concludes_nothing(
    store: JobStore, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With more tasks around an ambiguous submit than the list pages it reads (busy
    account), the job's own task may be out of sight: that proves nothing, so the job is
    neither requeued (paying twice) nor handed someone else's task."""
    clock = Clock()
    requeued: list[str] = []
    sim = SimServer(SimConfig(port=0, seed=2, inference_time_s=0.0, ambiguous_submit_rate=1.0))
    sim.start()
    try:
        with WaveSpeedClient(sim.url, "k") as provider, httpx.Client(base_url=sim.url) as control:
            deps = Deps(
                store=store,
                provider=provider,
                settings=replace(settings, webhook_public_url=""),
                clock=clock,
                enqueue_submit=requeued.append,
            )
            store.create("job-a", REQ, now=clock())
            assert submit_job(deps, "job-a").outcome is SubmitOutcome.AMBIGUOUS
            control.post("/_sim/config", json={"ambiguous_submit_rate": 0.0}).raise_for_status()
            # A busy account: more tasks in the window than the pages read (two here).
            monkeypatch.setattr(poller, "RECONCILE_MAX_PAGES", 2)
            for i in range(2 * 100 + 50):  # later tasks, each owned by some job
                task = provider.submit(REQ, webhook_url=None)
                store.redis.set(f"kq:pred:{task.id}", f"other-{i}")
            clock.advance(settings.ambiguous_grace_s + 1)
            sweep(deps)
            job = store.get("job-a")
            assert job is not None and job.state is JobState.SUBMITTING and job.ambiguous
            assert requeued == []
    finally:
        sim.stop()


@pytest.mark.parametrize("when", ["fresh", "after a transient error"])
def test_a_queued_job_whose_submit_message_was_lost_is_sent_again(
    when: str, store: JobStore, settings: Settings
) -> None:
    """kombu pops a message (BRPOP) before it records it as unacked, and a chunk sends its
    retries only at its end: a worker killed at the wrong instant loses a job's only
    submit message. A job still queued at its check gets a new one."""
    clock = Clock()
    resent: list[str] = []
    sim = SimServer(SimConfig(port=0, seed=4, inference_time_s=0.0, submit_5xx_rate=1.0))
    sim.start()
    try:
        with WaveSpeedClient(sim.url, "k") as provider:
            deps = Deps(
                store=store,
                provider=provider,
                settings=settings,
                clock=clock,
                enqueue_submit=resent.append,
            )
            producer = Producer(store=store, send=lambda ids: None, clock=clock)  # lost
            job_id = producer.enqueue(REQ)
            if when != "fresh":
                assert submit_job(deps, job_id).outcome is SubmitOutcome.RETRY  # retry lost
            sweep(deps)
            assert resent == []  # not before its check is due
            clock.advance(QUEUED_CHECK_S + 1)
            sweep(deps)
            assert resent == [job_id]
            sweep(deps)
            assert resent == [job_id]  # one new message per check, not a stream of them
    finally:
        sim.stop()


# --- found by chaos runs: two submits caught by one crash --------------------------------


@pytest.fixture
def lost_webhook_sim() -> Iterator[SimServer]:
    # Webhooks go to port 9 (nothing there): every delivery is lost.
    server = SimServer(SimConfig(port=0, seed=1, inference_time_s=0.0, webhook_retries=0))
    server.start()
    yield server
    server.stop()


def test_a_crashed_submit_never_adopts_another_jobs_task(
    lost_webhook_sim: SimServer, store: JobStore, settings: Settings
) -> None:
    """Two jobs caught by a kill -9 mid-submit: A before its POST (no task), B after it
    (a task, its webhook lost). A must not end with B's task, nor B pay twice."""
    clock = Clock()
    with WaveSpeedClient(lost_webhook_sim.url, "k") as provider:
        deps = Deps(store=store, provider=provider, settings=settings, clock=clock)
        now = clock()
        for job_id in ("job-a", "job-b"):
            store.create(job_id, REQ, now=now)
            store.transition(
                job_id,
                JobState.SUBMITTING,
                now=now,
                fields={"attempts": 1, "submitting_at": now},
                poll_at=now + submit_watchdog_s(settings),
            )
            now += 0.01  # A was claimed first, so the poller reaches it first
        provider.submit(REQ, webhook_url="http://127.0.0.1:9/webhooks/wavespeed?job=job-b&t=x")
        clock.advance(submit_watchdog_s(settings) + 1)
        sweep(deps)
        clock.advance(settings.ambiguous_grace_s + 1)
        sweep(deps)
        (task,) = httpx.get(f"{lost_webhook_sim.url}/_sim/tasks").json()["tasks"]
        a, b = store.get("job-a"), store.get("job-b")
        assert a is not None and b is not None
        assert a.prediction_id != task["id"]
        assert b.prediction_id in ("", task["id"])


def crashed_pair(
    store: JobStore, settings: Settings, clock: Clock, provider: WaveSpeedClient, *, task_for: str
) -> None:
    """job-a and job-b left `submitting` by a kill -9; the one named by `task_for` (if any)
    had created a task whose webhooks are all lost."""
    now = clock()
    for job_id in ("job-a", "job-b"):
        store.create(job_id, REQ, now=now)
        store.transition(
            job_id,
            JobState.SUBMITTING,
            now=now,
            fields={"attempts": 1, "submitting_at": now},
            poll_at=now + submit_watchdog_s(settings),
        )
        now += 0.01
    if task_for:
        hook = f"http://127.0.0.1:9/webhooks/wavespeed?job={task_for}&t=x"
        provider.submit(REQ, webhook_url=hook)


def test_unattributable_submits_fail_within_the_settle_bound_and_pay_once(
    lost_webhook_sim: SimServer, store: JobStore, settings: Settings
) -> None:
    """Two crashed submits, one task, no webhook: neither adopts it; both fail
    `submit_ambiguous` once the task has been finished for `ambiguous_settle_s` (not at
    the 1 h deadline), naming the task; nothing is sent again."""
    clock = Clock()
    with WaveSpeedClient(lost_webhook_sim.url, "k") as provider:
        deps = Deps(store=store, provider=provider, settings=settings, clock=clock)
        crashed_pair(store, settings, clock, provider, task_for="job-b")
        started = clock()
        clock.advance(submit_watchdog_s(settings) + 1)
        sweep(deps)  # marked ambiguous, candidate seen finished
        clock.advance(settings.ambiguous_grace_s + 1)
        sweep(deps)
        clock.advance(settings.ambiguous_settle_s + 1)
        for _ in range(3):
            clock.advance(settings.poll_max_interval_s)
            sweep(deps)
        (task,) = httpx.get(f"{lost_webhook_sim.url}/_sim/tasks").json()["tasks"]
        for job_id in ("job-a", "job-b"):
            job = store.get(job_id)
            assert job is not None and job.state is JobState.FAILED
            assert job.reason == "submit_ambiguous" and job.candidates == (task["id"],)
            assert not job.ambiguous
            assert job.finished_at - started < settings.job_deadline_s / 2
        assert len(httpx.get(f"{lost_webhook_sim.url}/_sim/tasks").json()["tasks"]) == 1


def test_a_crashed_submit_with_no_task_is_resent_and_the_webhook_settles_the_other(
    lost_webhook_sim: SimServer, store: JobStore, settings: Settings
) -> None:
    """The webhook naming job-b gives it its task; then job-a's window holds no unowned
    task, which proves job-a created none: it is sent again after the grace."""
    clock = Clock()
    with WaveSpeedClient(lost_webhook_sim.url, "k") as provider:
        resent: list[str] = []
        deps = Deps(
            store=store,
            provider=provider,
            settings=settings,
            clock=clock,
            enqueue_submit=resent.append,
        )
        crashed_pair(store, settings, clock, provider, task_for="job-b")
        clock.advance(submit_watchdog_s(settings) + 1)
        sweep(deps)
        (task,) = httpx.get(f"{lost_webhook_sim.url}/_sim/tasks").json()["tasks"]
        prediction = provider.get_result(task["id"])
        applied = apply_update(deps, "job-b", prediction, ResolvedBy.WEBHOOK, webhook_id="w-b")
        assert applied is not None and applied.applied
        clock.advance(settings.ambiguous_grace_s + 1)
        clock.advance(settings.poll_max_interval_s)
        sweep(deps)
        a, b = store.get("job-a"), store.get("job-b")
        assert a is not None and b is not None
        assert b.state is JobState.COMPLETED and b.prediction_id == task["id"]
        assert a.state is JobState.QUEUED and not a.prediction_id and resent == ["job-a"]


# --- found by chaos runs: the settle wait restarts with its candidate set ----------------


def test_a_candidate_that_appears_later_restarts_the_settle_wait(
    lost_webhook_sim: SimServer, store: JobStore, settings: Settings
) -> None:
    """`make chaos --seed 7`: two jobs left ambiguous by a crash saw their candidates
    finished (noted), then tasks created later inside their window (held submits of
    another crash, slow to start) became candidates too. When those finished, the jobs
    failed `submit_ambiguous` 11 s later, not `ambiguous_settle_s` later: the note was
    the old one, so a webhook of the new candidates still under retry is not waited for."""
    clock = Clock()
    with (
        WaveSpeedClient(lost_webhook_sim.url, "k") as provider,
        httpx.Client(base_url=lost_webhook_sim.url) as control,
    ):
        deps = Deps(store=store, provider=provider, settings=settings, clock=clock)
        crashed_pair(store, settings, clock, provider, task_for="job-b")
        clock.advance(submit_watchdog_s(settings) + 1)
        sweep(deps)  # ambiguous; the one candidate is finished: noted
        clock.advance(settings.ambiguous_settle_s - 1)
        # Another task lands in the window, unowned and still queued at the provider.
        control.post("/_sim/config", json={"queue_delay_s": 1.0}).raise_for_status()
        provider.submit(REQ, webhook_url="http://127.0.0.1:9/webhooks/wavespeed?job=x&t=x")
        clock.advance(settings.poll_max_interval_s)
        sweep(deps)  # not every candidate is finished: waiting
        wait_for(
            lambda: all(
                t["status"] == "completed" for t in control.get("/_sim/tasks").json()["tasks"]
            ),
            timeout_s=10,
        )
        clock.advance(settings.poll_max_interval_s)
        sweep(deps)  # the new candidate just finished: its webhooks may still come
        for job_id in ("job-a", "job-b"):
            job = store.get(job_id)
            assert job is not None and job.state is JobState.SUBMITTING, job
