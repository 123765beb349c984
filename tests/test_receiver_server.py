"""`kq receiver`'s two gunicorn worker classes: gevent (the default, in a process gevent
patched before anything else ran) and gthread (`--worker-class gthread`). Each serves a
genuine delivery end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis

from kq.cli import main
from tests.conftest import free_port, wait_for
from tests.support import make_submitted_job as make_job
from tests.support import prediction_body as body_for
from tests.test_hostile import hook_url, signed_headers
from worker.domain import JobState
from worker.settings import Settings
from worker.store import JobStore

PID = "5" * 32


@contextmanager
def receiver(
    redis_url: str, settings: Settings, args: list[str], stderr: list[bytes] | None = None
) -> Iterator[tuple[str, int]]:
    """`kq receiver ARGS` on a free port: (base URL, its pid). Its standard error is read
    only once it has stopped (into `stderr` if given)."""
    port = free_port()
    env = {
        **os.environ,
        "KQ_REDIS_URL": redis_url,
        "KQ_SECRET_KEY": settings.secret_key,
        "KQ_WEBHOOK_SECRET": settings.webhook_secret,
    }
    argv = [sys.executable, "-m", "kq.cli", "receiver", "--port", str(port), *args]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
            return False

    try:
        wait_for(up, timeout_s=30, interval_s=0.1)
        yield base, proc.pid
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    if stderr is not None:
        stderr.append(err)
    assert b"MonkeyPatchWarning" not in err  # gevent patched before ssl was imported


def settings_and_store(redis_url: str, redis_client: redis.Redis) -> tuple[Settings, JobStore]:
    settings = Settings(
        redis_url=redis_url,
        webhook_secret="whsec_cmVjZWl2ZXItc2VydmVyLXRlc3Qtc2VjcmV0",
        secret_key="receiver-server-test-secret-key-0123",
    )
    return settings, JobStore(redis_client, result_ttl_s=3600, events_maxlen=1000)


@pytest.mark.parametrize(
    ("args", "entry"),
    [
        ([], "kq.gevent_main"),
        (["--worker-class", "gthread", "--workers", "1", "--threads", "2"], "kq.cli"),
    ],
    ids=["gevent", "gthread"],
)
def test_each_worker_class_applies_a_delivery(
    args: list[str], entry: str, redis_url: str, redis_client: redis.Redis
) -> None:
    settings, store = settings_and_store(redis_url, redis_client)
    make_job(store, "served", PID)
    with receiver(redis_url, settings, args) as (base, pid):
        # gevent: the command started itself again through the module that patches first.
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert entry.encode() in command
        body = body_for(PID)
        answer = httpx.post(
            hook_url(base, settings, "served"),
            content=body,
            headers=signed_headers(settings, body),
            timeout=10,
        )
    assert answer.status_code == 200 and answer.json()["result"] == "applied"
    job = store.get("served")
    assert job is not None and job.state is JobState.COMPLETED


@pytest.mark.parametrize(
    "args",
    [[], ["--worker-class", "gthread", "--workers", "1", "--threads", "2"]],
    ids=["gevent", "gthread"],
)
def test_a_stalled_reader_of_its_standard_error_does_not_stop_the_receiver(
    args: list[str], redis_url: str, redis_client: redis.Redis
) -> None:
    """Nobody reads the receiver's standard error while it logs ~200 KB (a pipe holds
    64 KiB): every request is still answered, a delivery applied, and once the reader
    comes back every line is there (worker/log_sink.py)."""
    settings, store = settings_and_store(redis_url, redis_client)
    make_job(store, "stalled-log", PID)
    refusals = 1000
    err: list[bytes] = []
    with (
        receiver(redis_url, settings, args, stderr=err) as (base, _),
        httpx.Client(timeout=10) as client,
    ):
        body = body_for(PID)
        forged = {**signed_headers(settings, body), "webhook-signature": "v3,Zm9yZ2Vk"}
        for _ in range(refusals):  # each one logs receiver.bad_signature
            answer = client.post(
                hook_url(base, settings, "stalled-log"), content=body, headers=forged
            )
            assert answer.status_code == 401
        assert client.get(f"{base}/healthz").status_code == 200
        answer = client.post(
            hook_url(base, settings, "stalled-log"),
            content=body,
            headers=signed_headers(settings, body),
        )
        assert answer.status_code == 200 and answer.json()["result"] == "applied"
    assert err[0].count(b"receiver.bad_signature") == refusals
    assert b"log.dropped" not in err[0]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--workers", "0", "argument --workers: expected 1 or more, got 0"),
        ("--connections", "many", "argument --connections: expected a whole number, got 'many'"),
        ("--threads", "-2", "argument --threads: expected 1 or more, got -2"),
    ],
)
def test_sizes_below_one_are_refused_by_name(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["receiver", flag, value])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
