"""`kq status`: numbers against a known scenario on the real stack, and the alarms.

The scenario runs on the simulator with its fault knobs: jobs completed by webhook,
by poll (webhooks dropped), after 429s, and one rejected with a 400; plus forged
webhooks. `kq status --json` (a real subprocess) must then count each of them.
Alarm conditions that need a broken system (overdue jobs, dead processes) are built
directly in the session Redis, without workers.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from rich.console import Console

from kq.cli import main as kq_main
from kq.stack import Stack
from kq.ui import render_status
from tests.conftest import wait_for
from tests.support import fast_stack, is_terminal
from worker import keys, runtime
from worker.celery_app import configure
from worker.domain import EditRequest, JobState
from worker.producer import Producer
from worker.settings import Settings
from worker.snapshot import StatusConfig
from worker.status import collect, percentile
from worker.store import JobStore
from worker.tasks import enqueue_submits

pytestmark = pytest.mark.integration

IMAGE = "https://example.com/source.jpg"
BATCH = "scenario"


class Scenario:
    """The stack, and what the scenario did to it."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.env = {**os.environ, **stack.env}
        self.settings = Settings.from_env(self.env)
        configure(self.settings)
        self.store: JobStore = runtime.make_store(self.settings)
        self.producer = Producer(store=self.store, send=enqueue_submits)
        assert stack.sim_url is not None
        self.sim = httpx.Client(base_url=stack.sim_url, timeout=10)
        self.jobs: dict[str, list[str]] = {}

    def knobs(self, **values: Any) -> None:
        self.sim.post("/_sim/config", json=values).raise_for_status()

    def run(self, name: str, n: int, **knobs: Any) -> None:
        """Enqueue n jobs with the simulator set by `knobs`, wait until they are terminal."""
        self.knobs(**knobs)
        ids = [
            self.producer.enqueue({"prompt": f"{name} {i}", "image": IMAGE}, batch_id=BATCH)
            for i in range(n)
        ]
        for job_id in ids:
            wait_for(lambda j=job_id: is_terminal(self.store, j), timeout_s=40, interval_s=0.1)
        self.knobs(**{k: 0.0 for k in knobs})
        self.jobs[name] = ids

    def kq_status_json(self) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "kq.cli", "status", "--json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        data: dict[str, Any] = json.loads(out.stdout)
        return data


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    with fast_stack(tmp_path_factory.mktemp("stack"), seed=5) as stack:
        s = Scenario(stack)
        s.run("webhook", 4)
        s.run("poll", 2, drop_webhook_rate=1.0)
        s.run("rejected", 1, submit_400_rate=1.0)
        s.run("rate_limited", 1, burst_429_s=1.5)
        assert stack.receiver_url is not None
        for _ in range(3):  # forged deliveries: no valid signature
            r = httpx.post(
                f"{stack.receiver_url}/webhooks/wavespeed?job=x&t=y",
                content=b"{}",
                headers={"webhook-id": "forged", "webhook-timestamp": str(int(time.time()))},
            )
            assert r.status_code == 401
        # A submit is counted just after it is recorded, so a fast webhook can beat it.
        client = s.store.redis
        wait_for(lambda: _snap(client, s.settings)["recent"]["submitted"] == 7, timeout_s=10)
        yield s
        # The simulator keeps connections alive: close them here, not in the GC.
        s.sim.close()


def _snap(client: redis.Redis, settings: Settings, **kw: Any) -> dict[str, Any]:
    return collect(
        client,
        deadline_s=settings.job_deadline_s,
        webhooks_enabled=settings.webhooks_enabled,
        **kw,
    ).to_json()


def test_status_json_counts_the_scenario(scenario: Scenario) -> None:
    """Jobs by state, resolution split, retries and 429s, cost and DLQ match what ran."""
    snap = scenario.kq_status_json()
    assert snap["jobs"] == {
        "queued": 0,
        "submitting": 0,
        "submitted": 0,
        "completed": 7,
        "failed": 1,
        "cancelled": 0,
    }
    res = snap["resolution"]
    assert (res["webhook"], res["poll"], res["worker"]) == (5, 2, 1)
    assert res["missed_webhook_rate"] == pytest.approx(2 / 7)
    assert res["window"]["missed_webhook_rate"] == pytest.approx(2 / 7)
    recent = snap["recent"]
    assert recent["submitted"] == 7
    assert recent["rate_limited_429"] >= 1 and recent["submit_retries"] >= 1
    assert recent["webhooks"]["applied"] == 5
    assert recent["webhooks"]["bad_signature"] == 3
    assert recent["polls"] >= 2
    assert snap["cost"]["paid_jobs"] == 7 and snap["cost"]["total_usd"] == pytest.approx(0.56)
    assert snap["cost"]["today_usd"] == pytest.approx(0.56)
    assert snap["cost"]["running_batches"] == []  # the batch is finished
    assert snap["dlq"] == 1
    adm = snap["admission"]  # the stack lifts the limits against the simulator
    assert adm["slots_used"] == 0 and adm["slots_total"] == 100_000 and adm["waiting"] == 0
    assert adm["submits_last_minute"] >= 8
    (failure,) = snap["failures"]
    assert failure["job_id"] == scenario.jobs["rejected"][0]
    assert failure["reason"] == "submit_rejected" and "HTTP 400" in failure["error"]
    assert snap["latency"]["count"] == 8
    assert 0 < snap["latency"]["p50_s"] <= snap["latency"]["p95_s"]
    assert sum(p["completed"] + p["failed"] for p in snap["throughput"]) == 8
    assert snap["queues"] == {"kq": 0, "kq.poll": snap["queues"]["kq.poll"], "reserved": 0} or (
        snap["queues"]["kq"] == 0
    )
    assert snap["polling"]["scheduled"] == 0 and snap["overdue"]["count"] == 0


def test_status_sees_each_process_and_the_forged_webhooks(scenario: Scenario) -> None:
    """Worker, beat and both receiver processes beat; forged webhooks raise an alarm."""
    snap = scenario.kq_status_json()
    beats = snap["heartbeats"]
    procs = scenario.stack.procs
    assert [b["pid"] for b in beats["worker"]] == [procs["worker"].pid]
    assert [b["pid"] for b in beats["beat"]] == [procs["beat"].pid]
    assert len(beats["receiver"]) == 2  # gunicorn's two workers, each with its own beat
    names = {a["name"] for a in snap["alarms"]}
    assert names == {"webhook_rejections"}  # 2 of 7 by poll: below the 10-result minimum


def test_missed_webhook_alarm_over_threshold(scenario: Scenario) -> None:
    """With a lower minimum sample, 2 of 7 results by poll (29 %) exceeds the 25 % line."""
    cfg = StatusConfig(missed_webhook_min=5)
    snap = _snap(scenario.store.redis, scenario.settings, config=cfg)
    (alarm,) = [a for a in snap["alarms"] if a["name"] == "missed_webhooks"]
    assert "29%" in alarm["message"]


def test_status_text_and_watch_render(scenario: Scenario) -> None:
    """The human form names the counts, the processes and the alarm."""
    out = subprocess.run(
        [sys.executable, "-m", "kq.cli", "status"],
        env={**scenario.env, "COLUMNS": "160"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "completed" in out and "webhook_rejections" in out and "$0.56" in out
    assert "worker 1 ✓" in out and "beat 1 ✓" in out


# --- alarms on a broken system (session Redis, no workers) -----------------------------


def test_overdue_jobs_and_dead_processes_raise_alarms(
    store: JobStore, redis_client: redis.Redis, settings: Settings
) -> None:
    """A submitted job past its deadline is listed as overdue; no heartbeats -> alarms."""
    now = time.time()
    late, fresh = uuid.uuid4().hex, uuid.uuid4().hex
    request = EditRequest(prompt="p", image=IMAGE)
    for job_id, age in ((late, 7200.0), (fresh, 10.0)):
        store.create(job_id, request, batch_id="b", now=now - age)
        store.transition(job_id, JobState.SUBMITTING, now=now - age)
        store.transition(
            job_id,
            JobState.SUBMITTED,
            now=now - age,
            fields={"prediction_id": f"p-{job_id}", "submitted_at": now - age},
            expect_prediction_id=f"p-{job_id}",
            poll_at=now + 60,
        )
    assert redis_client.zcard(keys.POLL) == 2
    snap = collect(redis_client, deadline_s=3600, webhooks_enabled=True, now=now).to_json()
    assert snap["overdue"]["count"] == 1
    (job,) = snap["overdue"]["jobs"]
    assert job["job_id"] == late and job["age_s"] == pytest.approx(7200)
    assert snap["in_flight"] == 2
    (batch,) = snap["cost"]["running_batches"]
    assert (batch["batch_id"], batch["total"], batch["terminal"]) == ("b", 2, 0)
    names = {a["name"] for a in snap["alarms"]}
    assert names == {"overdue_jobs", "worker_down", "beat_down", "receiver_down"}

    stops = [runtime.start_heartbeat(role, redis_client) for role in ("worker", "beat")]
    try:
        wait_for(lambda: redis_client.zcard(keys.HEARTBEATS) == 2)
        snap = collect(redis_client, deadline_s=3600, webhooks_enabled=False, now=now).to_json()
        assert {a["name"] for a in snap["alarms"]} == {"overdue_jobs"}
        assert snap["heartbeats"]["worker"][0]["pid"] == os.getpid()
        assert snap["heartbeats"]["worker"][0]["host"] == socket.gethostname()
    finally:
        for stop in stops:
            stop.set()
    wait_for(lambda: redis_client.zcard(keys.HEARTBEATS) == 0)  # a clean stop unregisters


def test_status_on_an_empty_redis_and_cli_errors(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh Redis gives zeros, not errors; an unreachable one exits 2 with a message."""
    snap = collect(redis_client, deadline_s=3600, webhooks_enabled=False).to_json()
    assert snap["jobs"]["completed"] == 0 and snap["latency"]["p50_s"] is None
    assert snap["resolution"]["missed_webhook_rate"] is None
    monkeypatch.setenv("KQ_VAR_DIR", str(tmp_path))
    monkeypatch.setenv("KQ_REDIS_URL", "redis://127.0.0.1:1/0")
    assert kq_main(["status", "--json"]) == 2


def test_percentile_nearest_rank() -> None:
    """p50/p95 use the nearest-rank method."""
    assert percentile([], 0.5) is None
    assert percentile([1.0], 0.95) == 1.0
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.95)) == (50.0, 95.0)


def test_finished_jobs_are_off_the_poll_schedule_at_once(
    store: JobStore, redis_client: redis.Redis, settings: Settings
) -> None:
    """A finished batch shows 0 scheduled right away: re-posting it schedules nothing,
    and a stray entry for an ended job (which the poller drops only when it comes due)
    counts as `finished`, not as scheduled."""
    now = time.time()
    request = EditRequest(prompt="p", image=IMAGE)
    ids = [uuid.uuid4().hex for _ in range(50)]
    jobs = [(job_id, request, f"key-{i}", 0) for i, job_id in enumerate(ids)]
    store.create_many(jobs, batch_id="done", now=now - 120)
    for job_id in ids:
        store.transition(job_id, JobState.CANCELLED, now=now - 60, fields={"finished_at": now})
    waiting = uuid.uuid4().hex
    store.create(waiting, request, now=now)
    snap = collect(redis_client, deadline_s=3600, webhooks_enabled=False, now=now).to_json()
    assert snap["polling"] == {"due": 0, "scheduled": 1, "finished": 0}

    store.create_many(jobs, batch_id="done", now=now - 120)  # re-posted: nothing scheduled
    assert redis_client.zcard(keys.POLL) == 1
    redis_client.zadd(keys.POLL, {job_id: now + 60 - 120 for job_id in ids})  # strays
    snap = collect(redis_client, deadline_s=3600, webhooks_enabled=False, now=now).to_json()
    assert snap["polling"] == {"due": 0, "scheduled": 1, "finished": 50}
    # Past their check time they are due in kq:poll, but not counted as due.
    later = now + 120
    snap = collect(redis_client, deadline_s=3600, webhooks_enabled=False, now=later).to_json()
    assert snap["polling"] == {"due": 1, "scheduled": 1, "finished": 50}
    text = render_text(collect(redis_client, deadline_s=3600, webhooks_enabled=False, now=now))
    assert "0 due now, 1 scheduled (and 50 ended, dropped when due)" in text


def render_text(snapshot: Any) -> str:
    console = Console(width=160, record=True, file=io.StringIO())
    console.print(render_status(snapshot))
    return console.export_text()


def test_status_text_rounds_seconds(
    store: JobStore, redis_client: redis.Redis, settings: Settings
) -> None:
    """Durations read as people say them: tenths under 10 s, whole seconds, min, h."""
    now = time.time()
    request = EditRequest(prompt="p", image=IMAGE)
    for age in (7290.123456, 3.14159, 187.6):
        job_id = uuid.uuid4().hex
        store.create(job_id, request, now=now - age)
        store.transition(job_id, JobState.SUBMITTING, now=now - age)
        store.transition(
            job_id,
            JobState.SUBMITTED,
            now=now - age,
            fields={"prediction_id": f"p-{job_id}", "submitted_at": now - age},
            expect_prediction_id=f"p-{job_id}",
            poll_at=now + 60,
        )
        store.transition(
            job_id,
            JobState.COMPLETED,
            now=now,
            fields={"finished_at": now, "prediction_id": f"p-{job_id}", "resolved_by": "poll"},
        )
    late = uuid.uuid4().hex
    store.create(late, request, now=now - 7290.123456)
    store.transition(late, JobState.SUBMITTING, now=now - 7290.123456)
    text = render_text(collect(redis_client, deadline_s=3600, webhooks_enabled=False, now=now))
    assert "p50 3 min 08 s  p95 2 h 02 min" in text, text
    assert re.search(r"\b2 h 02 min\b", text.split("overdue", 2)[-1])  # the overdue job's age
    assert not re.search(r"(?<![$\d])\d+\.\d{2,}", text), text  # no long decimals but $
