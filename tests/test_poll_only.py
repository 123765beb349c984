"""Poll-only mode on real parts: without KQ_WEBHOOK_PUBLIC_URL the worker submits with
no webhook at all, and every job is resolved by the polling fallback."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from kq.stack import Stack, StackConfig
from tests.conftest import wait_for
from worker import runtime
from worker.celery_app import configure
from worker.domain import JobState
from worker.producer import Producer
from worker.settings import Settings
from worker.tasks import enqueue_submits

pytestmark = pytest.mark.integration


def test_poll_only_stack_resolves_by_polling(tmp_path: Path) -> None:
    """No public URL: submits carry no webhook, results arrive by poll, worker logs the mode."""
    config = StackConfig(
        var_dir=tmp_path,
        sim_args=("--inference-time", "0.2", "--seed", "3"),
        webhooks=False,
        start_receiver=False,
        worker_concurrency=2,
        extra_env={"KQ_POLL_AFTER_S": "0.5", "KQ_SWEEP_INTERVAL_S": "0.5"},
    )
    with Stack(config, announce=lambda line: None) as stack:
        settings = Settings.from_env({**os.environ, **stack.env})
        assert not settings.webhooks_enabled
        configure(settings)
        store = runtime.make_store(settings)
        receipt = Producer(store=store, send=enqueue_submits).enqueue_batch(
            [{"prompt": f"edit {i}", "image": "https://example.com/i.jpg"} for i in range(3)]
        )
        ids = store.batch_members(receipt.batch_id)

        def all_done() -> bool:
            return all(j is not None and j.terminal for j in store.get_many(ids))

        wait_for(all_done, timeout_s=30)
        for job in store.get_many(ids):
            assert job is not None and job.state is JobState.COMPLETED
            assert job.resolved_by == "poll"
        assert stack.sim_url is not None
        tasks = httpx.get(f"{stack.sim_url}/_sim/tasks").json()
        tasks = tasks["tasks"] if isinstance(tasks, dict) else tasks
        assert len(tasks) == 3 and not any(t.get("webhook") for t in tasks)
        log_text = (tmp_path / "logs" / "worker.log").read_text()
        assert log_text.count("mode.poll_only") == 1
