"""Copy-out end to end on the whole local stack (redis-server, simulator, receiver, a
Celery worker and beat as processes): KQ_OUTPUTS set, jobs complete, beat's
`kq.copy_outputs` copies their outputs into the directory, `kq job` shows them, and a
copy that keeps failing is flagged by `kq status` and ends when the simulator's short
retention deletes the output.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from kq.stack import Stack
from tests.conftest import wait_for
from tests.support import fast_stack
from worker import keys, runtime
from worker.celery_app import configure
from worker.domain import Job, JobState
from worker.event_types import OutputsEvent, decode_outputs_event
from worker.outputs import OutputsRecord, read_record
from worker.runtime import make_producer
from worker.settings import Settings
from worker.snapshot import AlarmName, StatusConfig
from worker.status import collect

pytestmark = pytest.mark.integration

IMAGE = "https://example.com/source.jpg"


class Harness:
    def __init__(self, stack: Stack, outputs: Path) -> None:
        self.stack = stack
        self.outputs = outputs
        self.settings = Settings.from_env({**os.environ, **stack.env})
        configure(self.settings)
        self.store = runtime.make_store(self.settings)
        self.redis = self.store.redis
        self.producer = make_producer(self.settings)
        assert stack.sim_url is not None
        self.sim = httpx.Client(base_url=stack.sim_url, timeout=10)

    def enqueue(self, prompt: str, **extra: Any) -> str:
        return self.producer.enqueue({"prompt": prompt, "image": IMAGE, **extra})

    def wait_completed(self, job_id: str) -> Job:
        def done() -> Job | None:
            job = self.store.get(job_id)
            return job if job is not None and job.terminal else None

        job: Job = wait_for(done, timeout_s=30, interval_s=0.1)
        assert job.state is JobState.COMPLETED, job
        return job

    def wait_outputs(self, job_id: str, timeout_s: float = 30) -> OutputsRecord:
        def settled() -> OutputsRecord | None:
            record = read_record(self.redis, job_id)
            return record if record is not None and record.settled else None

        record: OutputsRecord = wait_for(settled, timeout_s=timeout_s, interval_s=0.1)
        return record

    def outputs_events(self, job_id: str) -> list[OutputsEvent]:
        entries: Any = self.redis.xrange(keys.EVENTS)
        return [
            decode_outputs_event(i, f)
            for i, f in entries
            if f.get("type") == "outputs" and f.get("job_id") == job_id
        ]


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    var = tmp_path_factory.mktemp("stack")
    outputs = var / "kept"
    env = {"KQ_OUTPUTS": outputs.as_uri(), "KQ_OUTPUTS_RETRY_BASE_S": "0.2"}
    with fast_stack(var, seed=23, extra_env=env) as stack:
        h = Harness(stack, outputs)
        yield h
        h.sim.close()
        h.producer.close()


def test_outputs_are_copied_to_the_directory_and_shown_by_kq_job(harness: Harness) -> None:
    """Each completed job's output lands in KQ_OUTPUTS with the simulator's exact bytes (size
    following aspect_ratio), one `outputs` event carries the copy, and `kq job` shows the
    durable URI beside the provider's URL."""
    h = harness
    sizes = {"16:9": (1392, 752), "9:21": (672, 1568)}
    ids = {ratio: h.enqueue(f"kept {ratio}", aspect_ratio=ratio) for ratio in sizes}
    for ratio, job_id in ids.items():
        job = h.wait_completed(job_id)
        record = h.wait_outputs(job_id)
        assert record.state == "stored", record
        (copy,) = record.stored
        served = httpx.get(job.outputs[0]).content  # what the simulator serves for it
        path = h.outputs / job_id / "0.jpeg"
        assert copy.uri == path.as_uri() and copy.source_url == job.outputs[0]
        assert path.read_bytes() == served
        assert copy.size == len(served) and copy.sha256 == hashlib.sha256(served).hexdigest()
        assert copy.content_type == "image/jpeg"
        with Image.open(io.BytesIO(served)) as picture:
            assert picture.size == sizes[ratio]
        (event,) = h.outputs_events(job_id)
        assert event.state == "stored" and event.stored == record.stored
        assert event.batch_id == job.batch_id
        # The job's own result event came first and is unchanged (one per job).
        entries: Any = h.redis.xrange(keys.EVENTS)
        results = [f for _, f in entries if f["job_id"] == job_id and f.get("type") != "outputs"]
        assert len(results) == 1 and results[0]["state"] == "completed"

    job_id = ids["16:9"]
    env = {**os.environ, **h.stack.env}
    shown = subprocess.run(
        [sys.executable, "-m", "kq.cli", "job", job_id, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    data = json.loads(shown.stdout)
    assert data["outputs_state"] == "stored"
    assert data["stored_outputs"][0]["uri"] == (h.outputs / job_id / "0.jpeg").as_uri()
    assert data["outputs"] == [data["stored_outputs"][0]["source_url"]]
    table = subprocess.run(
        [sys.executable, "-m", "kq.cli", "job", job_id],
        env={**env, "COLUMNS": "300"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "stored_outputs" in table.stdout and f"{job_id}/0.jpeg" in table.stdout


def test_copy_that_keeps_failing_is_alarmed_then_ends_when_the_output_expires(
    harness: Harness,
) -> None:
    """With the outputs directory unusable the copy is retried and `kq status` raises
    `outputs_not_copied`; once the simulator's (short) retention deletes the output, the
    copy ends `failed` with reason `expired` and one event, and nothing loops."""
    h = harness
    backup = h.outputs.with_name("kept-aside")
    if h.outputs.exists():
        h.outputs.rename(backup)
    h.outputs.write_text("a file where the directory should be")
    try:
        job_id = h.enqueue("kept while the bucket is broken")
        h.wait_completed(job_id)

        def retrying() -> OutputsRecord | None:
            record = read_record(h.redis, job_id)
            return record if record is not None and record.state == "retrying" else None

        record = wait_for(retrying, timeout_s=30, interval_s=0.1)
        assert record.reason == "storage_failed"
        # A reader with a 1 s threshold (KQ_OUTPUTS_ALERT_AFTER_S) sees the job overdue.
        config = StatusConfig(outputs_alert_after_s=1.0)

        def alarmed() -> Any:
            snap = collect(h.redis, deadline_s=3600, webhooks_enabled=True, config=config)
            names = {a.name for a in snap.alarms}
            return snap if AlarmName.OUTPUTS_NOT_COPIED in names else None

        snap = wait_for(alarmed, timeout_s=15, interval_s=0.3)
        assert snap.outputs is not None and snap.outputs.overdue >= 1

        # The simulator's retention runs out: its output URLs answer 404 from now on.
        h.sim.post("/_sim/config", json={"retention_days": 1e-9}).raise_for_status()
        record = h.wait_outputs(job_id)
        assert record.state == "failed" and record.reason == "expired", record
        (event,) = h.outputs_events(job_id)
        assert event.state == "failed" and event.reason == "expired" and event.stored == ()
        assert h.redis.zscore(keys.OUTPUTS_DUE, job_id) is None
        snap = collect(h.redis, deadline_s=3600, webhooks_enabled=True, config=config)
        assert snap.outputs is not None and snap.outputs.failed_recent >= 1
        assert AlarmName.OUTPUTS_NOT_COPIED in {a.name for a in snap.alarms}
    finally:
        h.sim.post("/_sim/config", json={"retention_days": 7.0})
        h.outputs.unlink()
        if backup.exists():
            backup.rename(h.outputs)
        else:
            shutil.rmtree(backup, ignore_errors=True)
