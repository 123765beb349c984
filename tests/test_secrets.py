"""Secrets never reach a log line or an error message.

A whole stack (receiver, worker, beat as processes; Redis; a simulator that accepts only
our key and signs with our webhook secret) runs at DEBUG with a known API key, webhook
secret and KQ_SECRET_KEY, through submits that fail, retry, go ambiguous, get refused,
and webhooks that are mis-signed or dropped. Then every log file under the stack's
var/logs, every stored job error and event, and the text of the errors the client
raises are searched for each secret and for every job's URL token (`t=`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kq.stack import Stack, StackConfig
from tests.conftest import wait_for
from wavespeed_sim.config import SimConfig
from wavespeed_sim.server import SimServer
from worker import runtime
from worker.celery_app import configure
from worker.domain import EditRequest
from worker.errors import ProviderError
from worker.producer import Producer
from worker.settings import Settings
from worker.signing import job_token, webhook_url
from worker.tasks import enqueue_submits
from worker.wavespeed import WaveSpeedClient

pytestmark = pytest.mark.integration

API_KEY = "wsk-live-S3CRET-api-key-7f3a9c1e5b"
WEBHOOK_SECRET = "whsec_U0VDUkVULXdlYmhvb2stc2lnbmluZy1rZXktOTk="
SECRET_KEY = "kq-S3CRET-token-signing-key-4d2b8e6f0a"
JOBS = 12


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    config = SimConfig(
        port=0,
        seed=6,
        api_key=API_KEY,
        webhook_secret=WEBHOOK_SECRET,
        inference_time_s=0.1,
        queue_delay_s=0.0,
        webhook_retry_base_s=0.1,
        webhook_timeout_s=2.0,
        fail_rate=0.25,
        drop_webhook_rate=0.25,
        bad_signature_rate=0.25,
        stale_timestamp_rate=0.1,
        submit_5xx_rate=0.2,
        submit_429_rate=0.1,
        submit_400_rate=0.1,
        ambiguous_submit_rate=0.15,
    )
    server = SimServer(config)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def stack_run(
    sim: SimServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, list[str], Settings]]:
    """A stack at DEBUG that has taken JOBS edits to a terminal state; yields its var dir."""
    var_dir: Path = tmp_path_factory.mktemp("secrets")
    config = StackConfig(
        var_dir=var_dir,
        wavespeed_api_key=API_KEY,
        wavespeed_base_url=sim.url,
        worker_concurrency=4,
        extra_env={
            "KQ_SECRET_KEY": SECRET_KEY,
            "KQ_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "KQ_LOG_LEVEL": "DEBUG",
            "KQ_POLL_AFTER_S": "1",
            "KQ_SWEEP_INTERVAL_S": "0.3",
            "KQ_AMBIGUOUS_GRACE_S": "2",
            "KQ_JOB_DEADLINE_S": "30",
        },
    )
    with Stack(config, announce=lambda line: None) as stack:
        settings = Settings.from_env({**os.environ, **stack.env})
        configure(settings)
        store = runtime.make_store(settings)
        producer = Producer(store=store, send=enqueue_submits)
        ids = [
            producer.enqueue({"prompt": f"secret test {i}", "image": "https://example.com/a.jpg"})
            for i in range(JOBS)
        ]
        wait_for(
            lambda: all(j is not None and j.terminal for j in store.get_many(ids)),
            timeout_s=60,
            interval_s=0.2,
        )
        # A forged delivery and one with a wrong token get logged by the receiver too.
        assert stack.receiver_url is not None
        httpx.post(
            webhook_url(stack.receiver_url, SECRET_KEY, ids[0]),
            content=b"{}",
            headers={"webhook-id": "x", "webhook-timestamp": "1", "webhook-signature": "v3,0"},
        )
        yield var_dir, ids, settings
        store.redis.close()


def secret_forms(ids: list[str]) -> dict[str, str]:
    """Each secret in every form it could leak in, by a name to report it under."""
    forms = {
        "api key": API_KEY,
        "webhook secret": WEBHOOK_SECRET,
        "webhook secret key bytes": WEBHOOK_SECRET.removeprefix("whsec_"),
        "KQ_SECRET_KEY": SECRET_KEY,
    }
    forms |= {f"token of job {i}": job_token(SECRET_KEY, job_id) for i, job_id in enumerate(ids)}
    return forms


def leaks(text: str, forms: dict[str, str]) -> list[str]:
    return [name for name, value in forms.items() if value in text]


def test_no_secret_in_any_log_file(stack_run: tuple[Path, list[str], Settings]) -> None:
    """Every log line of every process (DEBUG, faults on every path) is free of secrets."""
    var_dir, ids, _ = stack_run
    logs = sorted((var_dir / "logs").glob("*.log"))
    assert {p.stem for p in logs} >= {"receiver", "worker", "beat"}
    forms = secret_forms(ids)
    found = {}
    for path in logs:
        text = path.read_text(errors="replace")
        assert text.strip(), f"{path.name} is empty: nothing was checked"
        for line_no, line in enumerate(text.splitlines(), 1):
            if hit := leaks(line, forms):
                found[f"{path.name}:{line_no}"] = hit
    assert found == {}
    worker_log = (var_dir / "logs" / "worker.log").read_text()
    assert "submit.ok" in worker_log and "HTTP Request: POST" in worker_log  # a real run


def test_no_secret_in_stored_errors_or_events(stack_run: tuple[Path, list[str], Settings]) -> None:
    """The error texts stored on jobs and sent on the event stream carry no secret."""
    _, ids, settings = stack_run
    store = runtime.make_store(settings)
    try:
        jobs = [j for j in store.get_many(ids) if j is not None]
        assert len(jobs) == JOBS and any(j.error for j in jobs)
        forms = secret_forms(ids)
        for job in jobs:
            assert leaks(job.error, forms) == [], job
        for _, event in store.events():
            assert leaks(" ".join(event.values()), forms) == [], event
    finally:
        store.redis.close()


def test_no_secret_in_client_error_messages(sim: SimServer) -> None:
    """The errors the provider client raises (refusals, wrong key, dead host) name the call
    and the status, never the key, the webhook secret or the URL token."""
    hook = webhook_url("http://127.0.0.1:9", SECRET_KEY, "job-x")
    request = EditRequest(prompt="p", image="https://example.com/a.jpg")
    messages: list[str] = []
    with httpx.Client(base_url=sim.url) as control:
        control.post("/_sim/config", json={"submit_400_rate": 1.0}).raise_for_status()
        try:
            for key, base in (
                (API_KEY, sim.url),  # 400 from the provider
                (API_KEY + "-wrong", sim.url),  # 401
                (API_KEY, "http://127.0.0.1:9"),  # nothing listening
            ):
                with WaveSpeedClient(base, key, timeout_s=2) as client:
                    for call in (
                        lambda c=client: c.submit(request, webhook_url=hook),
                        lambda c=client: c.get_result("0" * 32),
                        lambda c=client: c.webhook_secret(),
                    ):
                        try:
                            call()
                        except ProviderError as exc:
                            messages.append(f"{exc!s} {exc!r}")
        finally:
            control.post("/_sim/config", json={"submit_400_rate": 0.0}).raise_for_status()
    forms = {**secret_forms(["job-x"]), "wrong key": API_KEY + "-wrong"}
    assert len(messages) == 8  # the webhook secret call succeeds with the right key
    assert [m for m in messages if leaks(m, forms)] == []
