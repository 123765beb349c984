"""Copy-out of outputs (worker/outputs/) on real parts: a private redis-server, real HTTP
servers standing in for the provider's file host (one per bad case), the local-directory
backend on disk, and the copy-out sweep called as `kq.copy_outputs` calls it.

The S3 backend runs against moto's standalone S3 server (a subprocess speaking S3 over
HTTP). The end-to-end path through the whole stack (simulator, worker, beat) is in
tests/test_outputs_e2e.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from PIL import Image

from kq.stack_config import StackConfig, outputs_default
from tests.conftest import free_port, wait_for
from tests.support import REQ, fast_stack, serve_in_thread
from worker import keys, runtime
from worker.alarms import outputs_alarms
from worker.celery_app import configure
from worker.domain import JobState
from worker.errors import ConfigError
from worker.event_types import decode_outputs_event
from worker.metrics import outputs_metrics
from worker.outputs import (
    Copier,
    LocalStorage,
    OutputsStore,
    StorageError,
    open_storage,
    read_record,
)
from worker.outputs.fetch import sniff
from worker.outputs.records import read_backlog
from worker.settings import Settings
from worker.snapshot import AlarmName, StatusConfig
from worker.store import JobStore

pytestmark = pytest.mark.integration


def _png(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()
BIG = b"\xff\xd8\xff\xe0" + b"\0" * 5000  # JPEG magic, over the 4 KB limit the tests set


class FileHost:
    """A WSGI app standing in for the provider's output host, one path per behaviour;
    counts the requests each path got."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.flaky_failures = 2
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start: Callable[..., Any]) -> list[bytes]:
        path = environ["PATH_INFO"]
        with self.lock:
            self.hits[path] = self.hits.get(path, 0) + 1
            hits = self.hits[path]
        if path.startswith("/ok"):
            return self._answer(start, "200 OK", PNG, "image/png")
        if path == "/gone":
            return self._answer(start, "404 Not Found", b"expired", "text/plain")
        if path == "/html":
            # Claims to be an image; the bytes say otherwise.
            return self._answer(start, "200 OK", b"<html>login page</html>", "image/jpeg")
        if path == "/big":
            return self._answer(start, "200 OK", BIG, "image/jpeg")
        if path == "/big-unsized":
            start("200 OK", [("Content-Type", "image/jpeg")])
            return [BIG[i : i + 1000] for i in range(0, len(BIG), 1000)]
        if path == "/slow":
            time.sleep(1.5)
            return self._answer(start, "200 OK", PNG, "image/png")
        if path == "/flaky":
            if hits <= self.flaky_failures:
                return self._answer(start, "503 Service Unavailable", b"busy", "text/plain")
            return self._answer(start, "200 OK", PNG, "image/png")
        return self._answer(start, "404 Not Found", b"", "text/plain")

    @staticmethod
    def _answer(start: Callable[..., Any], status: str, body: bytes, ctype: str) -> list[bytes]:
        start(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
        return [body]


@pytest.fixture(scope="module")
def host_app() -> FileHost:
    return FileHost()


@pytest.fixture(scope="module")
def host(host_app: FileHost) -> Iterator[str]:
    with serve_in_thread(host_app, poll_interval_s=0.1) as url:
        yield url


@pytest.fixture
def kept_store(redis_client: redis.Redis) -> JobStore:
    """A job store that queues completed jobs for copy-out, as with KQ_OUTPUTS set."""
    return JobStore(redis_client, result_ttl_s=3600, events_maxlen=10_000, keep_outputs=True)


@pytest.fixture
def copy_settings(settings: Settings, tmp_path: Path) -> Settings:
    return settings.with_overrides(
        outputs_url=(tmp_path / "outputs").as_uri(),
        outputs_timeout_s=0.5,
        outputs_max_bytes=4096,
        outputs_retry_base_s=0.05,
        outputs_max_attempts=3,
    )


def make_copier(client: redis.Redis, settings: Settings) -> Copier:
    records = OutputsStore(client, events_maxlen=10_000, failed_ttl_s=3600)
    storage = open_storage(settings.outputs_url, s3_endpoint_url=settings.s3_endpoint_url)
    return Copier(records, storage, settings)


@pytest.fixture
def copier(redis_client: redis.Redis, copy_settings: Settings) -> Iterator[Copier]:
    c = make_copier(redis_client, copy_settings)
    yield c
    c.http.close()


def complete_job(
    store: JobStore, job_id: str, outputs: list[str], *, finished_at: float | None = None
) -> None:
    """A job moved to `completed` with these outputs, as the webhook or poller does it."""
    now = time.time()
    store.create(job_id, REQ, now=now, idempotency_key=f"key-{job_id}")
    store.transition(job_id, JobState.SUBMITTING, now=now)
    pid = hashlib.md5(job_id.encode(), usedforsecurity=False).hexdigest()
    store.transition(
        job_id,
        JobState.SUBMITTED,
        now=now,
        fields={"prediction_id": pid, "submitted_at": now},
        expect_prediction_id=pid,
    )
    result = store.transition(
        job_id,
        JobState.COMPLETED,
        now=now,
        fields={"outputs": json.dumps(outputs), "finished_at": finished_at or now},
    )
    assert result.applied


def outputs_events(client: redis.Redis, job_id: str) -> list[Any]:
    entries: Any = client.xrange(keys.EVENTS)
    return [
        decode_outputs_event(i, f)
        for i, f in entries
        if f.get("type") == "outputs" and f.get("job_id") == job_id
    ]


def settle(copier: Copier, client: redis.Redis, job_id: str, timeout_s: float = 15) -> Any:
    """Run sweeps (as beat would, each second; here back to back) until the job's copy-out
    has settled; its record."""

    def settled() -> Any:
        copier.sweep()
        record = read_record(client, job_id)
        return record if record is not None and record.settled else None

    return wait_for(settled, timeout_s=timeout_s, interval_s=0.05)


def test_completion_queues_the_job_for_copy_out_only_when_kept(
    redis_client: redis.Redis, kept_store: JobStore, store: JobStore
) -> None:
    """The move that completes a job queues it on kq:outputs:due when outputs are kept,
    and only then; a job with no outputs is not queued."""
    complete_job(kept_store, "kept", ["https://o.example/1.jpeg"])
    complete_job(kept_store, "empty", [])
    complete_job(store, "not-kept", ["https://o.example/2.jpeg"])
    assert redis_client.zrange(keys.OUTPUTS_DUE, 0, -1) == ["kept"]
    assert read_record(redis_client, "kept") is not None
    assert read_record(redis_client, "not-kept") is None


def test_copy_to_local_dir_records_the_copy_and_one_event(
    redis_client: redis.Redis, kept_store: JobStore, copier: Copier, host: str, tmp_path: Path
) -> None:
    """A completed job's output is copied to the directory with its size, content type and
    SHA-256; the job records it and one `outputs` event carries it."""
    url = f"{host}/ok/1.png"
    complete_job(kept_store, "job-ok", [url])
    record = settle(copier, redis_client, "job-ok")
    assert record.state == "stored" and record.error == ""
    (copy,) = record.stored
    path = tmp_path / "outputs" / "job-ok" / "0.png"
    assert copy.uri == path.as_uri()
    assert path.read_bytes() == PNG
    assert copy.size == len(PNG)
    assert copy.sha256 == hashlib.sha256(PNG).hexdigest()
    assert copy.content_type == "image/png" and copy.source_url == url
    (event,) = outputs_events(redis_client, "job-ok")
    assert event.schema == 2 and event.type == "outputs" and event.state == "stored"
    assert event.stored == record.stored and event.reason == "" and event.error == ""
    assert event.idempotency_key == "key-job-ok" and event.finished_at
    # Settled: off the schedule, and further sweeps do nothing more.
    assert redis_client.zscore(keys.OUTPUTS_DUE, "job-ok") is None
    assert copier.sweep().claimed == 0
    assert len(outputs_events(redis_client, "job-ok")) == 1


def test_recording_twice_appends_one_event(redis_client: redis.Redis, kept_store: JobStore) -> None:
    """A second copier settling the same job (its lease ran out) changes nothing."""
    complete_job(kept_store, "twice", ["https://o.example/1.jpeg"])
    records = OutputsStore(redis_client, events_maxlen=10_000, failed_ttl_s=3600)
    first = records.record("twice", "stored", [], now=time.time())
    second = records.record("twice", "failed", [], error="late", reason="timeout", now=time.time())
    assert first[0] == "applied" and second == ("duplicate", first[1])
    assert [e.state for e in outputs_events(redis_client, "twice")] == ["stored"]


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/gone", "expired"),
        ("/html", "not_image"),
        ("/big", "too_large"),
        ("/big-unsized", "too_large"),
    ],
)
def test_bad_provider_output_fails_at_once_with_its_reason(
    redis_client: redis.Redis,
    kept_store: JobStore,
    copier: Copier,
    host: str,
    host_app: FileHost,
    tmp_path: Path,
    path: str,
    reason: str,
) -> None:
    """An expired URL, a body that is no image (whatever its header says) and an image over
    the limit are permanent: one try, a `failed` event with the reason, nothing stored."""
    job_id = f"bad{path.replace('/', '-')}"
    before = host_app.hits.get(path, 0)
    complete_job(kept_store, job_id, [f"{host}{path}"])
    record = settle(copier, redis_client, job_id)
    assert record.state == "failed" and record.reason == reason and record.stored == ()
    assert host_app.hits[path] == before + 1  # not retried
    (event,) = outputs_events(redis_client, job_id)
    assert event.state == "failed" and event.reason == reason and event.stored == ()
    assert event.error
    assert not (tmp_path / "outputs" / job_id).exists()
    assert redis_client.zscore(keys.OUTPUTS_FAILED, job_id) is not None


def test_slow_server_times_out_and_gives_up_after_the_attempts(
    redis_client: redis.Redis, kept_store: JobStore, copier: Copier, host: str, host_app: FileHost
) -> None:
    """A server slower than the timeout is retried with back-off, then given up after
    KQ_OUTPUTS_MAX_ATTEMPTS downloads with reason `timeout`: it never loops."""
    before = host_app.hits.get("/slow", 0)
    complete_job(kept_store, "slow", [f"{host}/slow"])
    record = settle(copier, redis_client, "slow", timeout_s=30)
    assert record.state == "failed" and record.reason == "timeout"
    assert record.attempts == copier.settings.outputs_max_attempts == 3
    assert "after 3 failed downloads" in record.error
    assert host_app.hits["/slow"] - before == 3
    assert [e.reason for e in outputs_events(redis_client, "slow")] == ["timeout"]


def test_passing_provider_errors_are_retried_then_stored(
    redis_client: redis.Redis, kept_store: JobStore, copier: Copier, host: str, host_app: FileHost
) -> None:
    """503s from the file host are retried with back-off until the copy succeeds."""
    host_app.hits.pop("/flaky", None)
    complete_job(kept_store, "flaky", [f"{host}/flaky"])
    record = settle(copier, redis_client, "flaky")
    assert record.state == "stored" and record.attempts == 2
    assert host_app.hits["/flaky"] == 3
    stats = redis_client.hgetall(keys.OUTPUTS_STATS)
    assert int(stats["retries"]) == 2 and int(stats["stored"]) == 1


def test_broken_storage_is_retried_alarmed_and_given_up_at_the_deadline(
    redis_client: redis.Redis,
    kept_store: JobStore,
    copy_settings: Settings,
    host: str,
    tmp_path: Path,
) -> None:
    """A bucket that refuses writes keeps the job due (retried, not counted against the
    download attempts), flags it in `kq status` once it is older than the alert threshold,
    and ends `storage_failed` at the overall deadline."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the directory should be")
    settings = copy_settings.with_overrides(
        outputs_url=(blocker / "outputs").as_uri(), outputs_give_up_s=3600 + 2.0
    )
    copier = make_copier(redis_client, settings)
    # Completed an hour ago: past the alert threshold below.
    complete_job(kept_store, "stuck", [f"{host}/ok/2.png"], finished_at=time.time() - 3600)
    copier.sweep()
    record = read_record(redis_client, "stuck")
    assert record is not None and record.state == "retrying"
    assert record.reason == "storage_failed" and "cannot write" in record.error

    cfg = StatusConfig(outputs_alert_after_s=1800)
    backlog = read_backlog(
        redis_client,
        time.time(),
        alert_after_s=cfg.outputs_alert_after_s,
        failed_window_s=cfg.outputs_failed_window_s,
    )
    assert backlog is not None and backlog.pending == 1 and backlog.overdue == 1
    (alarm,) = outputs_alarms(backlog, cfg)
    assert alarm.name is AlarmName.OUTPUTS_NOT_COPIED and "1 completed job(s)" in alarm.message
    exported = {m.name: m.samples for m in outputs_metrics(backlog)}
    assert exported["kq_outputs_pending"][0].value == 1
    assert exported["kq_outputs_overdue"][0].value == 1
    assert exported["kq_outputs_oldest_pending_seconds"][0].value >= 3600
    assert exported["kq_outputs_retries"][0].value == 1

    # Past the deadline (an hour and 2 s after the job ended): given up.
    record = settle(copier, redis_client, "stuck")
    assert record.state == "failed" and record.reason == "storage_failed"
    assert "still failing" in record.error
    copier.http.close()


def test_sniff_knows_images_by_their_bytes() -> None:
    """Content types come from the magic bytes, not from what a server claims."""
    assert sniff(PNG[:32]) == "image/png"
    assert sniff(b"\xff\xd8\xff\xe0\0\x10JFIF") == "image/jpeg"
    assert sniff(b"RIFF\x10\0\0\0WEBPVP8 ") == "image/webp"
    assert sniff(b"GIF89a\x01\0") == "image/gif"
    assert sniff(b"\0\0\0\x1cftypavif") == "image/avif"
    assert sniff(b"<html>") is None and sniff(b"") is None


def test_local_storage_refuses_keys_outside_its_directory(tmp_path: Path) -> None:
    """A key cannot climb out of the outputs directory."""
    storage = LocalStorage(tmp_path / "out")
    with pytest.raises(StorageError):
        storage.put(
            "../escape.png", io.BytesIO(PNG), size=len(PNG), content_type="image/png", sha256=""
        )


def test_settings_read_the_outputs_variables() -> None:
    """KQ_OUTPUTS and its tunables are read in Settings.from_env; `off` turns it off."""
    base = {"KQ_REDIS_URL": "redis://127.0.0.1:1/0", "KQ_SECRET_KEY": "k"}
    s = Settings.from_env(
        {
            **base,
            "KQ_OUTPUTS": "s3://bucket/kq",
            "KQ_S3_ENDPOINT_URL": "http://minio:9000",
            "KQ_OUTPUTS_MAX_BYTES": "1000",
            "KQ_OUTPUTS_ALERT_AFTER_S": "60",
        }
    )
    assert s.keep_outputs and s.outputs_url == "s3://bucket/kq"
    assert s.s3_endpoint_url == "http://minio:9000"
    assert s.outputs_max_bytes == 1000 and s.outputs_alert_after_s == 60
    assert not Settings.from_env({**base, "KQ_OUTPUTS": "off"}).keep_outputs
    assert not Settings.from_env(base).keep_outputs
    with pytest.raises(ConfigError, match="KQ_OUTPUTS"):
        Settings.from_env({**base, "KQ_OUTPUTS": "ftp://x/y"})


def test_download_client_is_not_routed_through_env_proxies(copier: Copier) -> None:
    """Provider URLs are fetched directly (trust_env off), like the worker's own calls."""
    assert isinstance(copier.http, httpx.Client) and not copier.http._trust_env


# --- S3: moto's standalone S3 server, a real HTTP server in a subprocess ----------------

BUCKET = "kq-outputs"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3-speaking HTTP server on a free port (`moto[server]`, a dev dependency)."""
    binary = Path(sys.executable).parent / "moto_server"
    if not binary.exists():
        if os.environ.get("CI"):
            pytest.fail("moto_server is not installed (pip install -e '.[dev]')")
        pytest.skip("moto_server is not installed")
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    proc = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/moto-api/", timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout_s=30, interval_s=0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A boto3 client of the moto server, with a fresh bucket; credentials come from the
    standard AWS variables, as in production."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.session.Session().client("s3", endpoint_url=s3_endpoint)
    httpx.post(f"{s3_endpoint}/moto-api/reset")
    client.create_bucket(Bucket=BUCKET)
    yield client
    client.close()


def test_copy_to_s3_stores_the_object_with_its_type_and_digest(
    redis_client: redis.Redis,
    kept_store: JobStore,
    copy_settings: Settings,
    s3: Any,
    s3_endpoint: str,
    host: str,
) -> None:
    """With KQ_OUTPUTS=s3://bucket/prefix the copy lands in the bucket (through boto3, over
    HTTP): the object's bytes, content type and sha256 metadata match the record."""
    settings = copy_settings.with_overrides(
        outputs_url=f"s3://{BUCKET}/kq/runs", s3_endpoint_url=s3_endpoint
    )
    copier = make_copier(redis_client, settings)
    complete_job(kept_store, "s3-job", [f"{host}/ok/3.png"])
    record = settle(copier, redis_client, "s3-job")
    assert record.state == "stored"
    (copy,) = record.stored
    assert copy.uri == f"s3://{BUCKET}/kq/runs/s3-job/0.png"
    obj = s3.get_object(Bucket=BUCKET, Key="kq/runs/s3-job/0.png")
    body = obj["Body"].read()
    assert body == PNG and hashlib.sha256(body).hexdigest() == copy.sha256
    assert obj["ContentType"] == "image/png" and obj["Metadata"]["sha256"] == copy.sha256
    (event,) = outputs_events(redis_client, "s3-job")
    assert event.state == "stored" and event.stored[0].uri == copy.uri
    copier.http.close()


def test_missing_bucket_is_retried_not_given_up(
    redis_client: redis.Redis,
    kept_store: JobStore,
    copy_settings: Settings,
    s3: Any,
    s3_endpoint: str,
    host: str,
) -> None:
    """A bucket error is a storage failure: the job stays due with the S3 error recorded,
    retried until the overall deadline (the provider still has the image)."""
    settings = copy_settings.with_overrides(
        outputs_url="s3://no-such-bucket/x", s3_endpoint_url=s3_endpoint
    )
    copier = make_copier(redis_client, settings)
    complete_job(kept_store, "s3-missing", [f"{host}/ok/4.png"])
    assert copier.sweep().outcomes == {"retry": 1}
    record = read_record(redis_client, "s3-missing")
    assert record is not None and record.state == "retrying"
    assert record.reason == "storage_failed" and "NoSuchBucket" in record.error
    assert redis_client.zscore(keys.OUTPUTS_DUE, "s3-missing") is not None
    assert outputs_events(redis_client, "s3-missing") == []
    copier.http.close()


def test_local_stack_keeps_outputs_in_var_unless_told_otherwise(tmp_path: Path) -> None:
    """`kq up` / `kq run` copy into var/outputs by default; the user's KQ_OUTPUTS (a place of
    their own, or `off`) wins; a stack not asked to keep outputs sets nothing."""

    def user(**env: str) -> Settings:
        return Settings.from_env(env, local_stack=True)

    keep = StackConfig(var_dir=tmp_path / "var", keep_outputs=True)
    default = outputs_default(keep, user())
    assert default == {"KQ_OUTPUTS": (tmp_path / "var" / "outputs").resolve().as_uri()}
    assert outputs_default(keep, user(KQ_OUTPUTS="off")) == {}
    assert outputs_default(keep, user(KQ_OUTPUTS="s3://b/p")) == {}
    assert outputs_default(StackConfig(var_dir=tmp_path), user()) == {}


def test_whole_stack_copies_to_s3(s3: Any, s3_endpoint: str, tmp_path: Path) -> None:
    """Through the real stack (simulator, receiver, Celery worker and beat as processes):
    with KQ_OUTPUTS=s3://... and KQ_S3_ENDPOINT_URL, the worker copies a completed job's
    output into the bucket, credentials from the standard AWS variables."""
    env = {
        "KQ_OUTPUTS": f"s3://{BUCKET}/stack",
        "KQ_S3_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with fast_stack(tmp_path / "var", seed=5, extra_env=env) as stack:
        settings = stack.child_settings()
        configure(settings)
        producer = runtime.make_producer(settings)
        job_id = producer.enqueue(
            {"prompt": "kept in a bucket", "image": "https://example.com/a.jpg"}
        )
        client = producer.store.redis

        def settled() -> Any:
            record = read_record(client, job_id)
            return record if record is not None and record.settled else None

        record = wait_for(settled, timeout_s=60, interval_s=0.2)
        assert record.state == "stored", record
        (copy,) = record.stored
        assert copy.uri == f"s3://{BUCKET}/stack/{job_id}/0.jpeg"
        job = producer.get_job(job_id)
        assert job is not None and copy.source_url == job.outputs[0]
        body = s3.get_object(Bucket=BUCKET, Key=f"stack/{job_id}/0.jpeg")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == copy.sha256 and body[:3] == b"\xff\xd8\xff"
        assert body == httpx.get(copy.source_url).content
        producer.close()
