"""A provider that answers badly: the service and the poller against a small local HTTP
server that returns canned bodies (HTML error pages, envelopes without `data`, unknown
statuses, truncated JSON, bodies cut short on the wire), on a private Redis.

Each bad answer is an error that says which call and what came back, and is retried or
failed by rule: never an exception out of `submit_job` or `sweep`, never a job polled
again at once (no crash loop), never a job left unresolved past its deadline. The
producer side refuses huge prompts, non-http image URLs and non-finite guidance before
anything is stored.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis

from tests.support import Clock
from worker import keys
from worker.domain import EditRequest, JobState
from worker.errors import ValidationError
from worker.poller import sweep
from worker.producer import Producer
from worker.service import Deps, SubmitOutcome, submit_job
from worker.settings import Settings
from worker.store import JobStore
from worker.wavespeed import WaveSpeedClient

PID = "0123456789abcdef0123456789abcdef"
REQ = EditRequest(prompt="make it blue", image="https://example.com/a.jpg")
HTML_PAGE = (
    b"<html><head><title>502 Bad Gateway</title></head>\n"
    b"<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)


def prediction(status: str = "processing", **extra: Any) -> dict[str, Any]:
    return {"id": PID, "status": status, "outputs": [], "error": "", **extra}


def envelope(data: Any) -> bytes:
    return json.dumps({"code": 200, "message": "success", "data": data}).encode()


@dataclass(frozen=True)
class Canned:
    """One answer: a status and a body, optionally cut short on the wire."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    cut_after: int | None = None  # send the headers for the full body, then only this much


class CannedProvider:
    """A local HTTP server answering each kind of call (submit, result, list) as told."""

    def __init__(self) -> None:
        self.answers: dict[str, Canned] = {}
        self.calls: Counter[str] = Counter()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._answer()

            def _answer(self) -> None:
                path = self.path.split("?", 1)[0]
                if path.endswith("/result"):
                    kind = "result"
                elif path == "/api/v3/predictions":
                    kind = "list"
                elif path == "/api/v3/predictions/delete":
                    kind = "delete"
                else:
                    kind = "submit"
                owner.calls[kind] += 1
                canned = owner.answers.get(kind, Canned(404, b'{"code":404,"message":"no"}'))
                self.send_response(canned.status)
                self.send_header("Content-Type", canned.content_type)
                self.send_header("Content-Length", str(len(canned.body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(canned.body[: canned.cut_after])
                self.wfile.flush()
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,))
        self._thread.daemon = True

    def __enter__(self) -> CannedProvider:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


@pytest.fixture
def provider() -> Iterator[CannedProvider]:
    with CannedProvider() as server:
        yield server


@pytest.fixture
def deps(provider: CannedProvider, store: JobStore, settings: Settings) -> Iterator[Deps]:
    client = WaveSpeedClient(provider.url, settings.wavespeed_api_key, timeout_s=5)
    yield Deps(
        store=store,
        provider=client,
        settings=replace(settings, wavespeed_base_url=provider.url, job_deadline_s=60),
        clock=Clock(),
    )
    client.close()


def submitted_job(store: JobStore, job_id: str = "job1") -> str:
    now = time.time()
    store.create(job_id, REQ, now=now)
    store.transition(job_id, JobState.SUBMITTING, now=now, fields={"submitting_at": now})
    store.transition(
        job_id,
        JobState.SUBMITTED,
        now=now,
        fields={"prediction_id": PID, "submitted_at": now},
        expect_prediction_id=PID,
        poll_at=now,
    )
    return job_id


def no_secrets(text: str, settings: Settings) -> bool:
    return all(s not in text for s in (settings.wavespeed_api_key, settings.secret_key))


# --- submit -------------------------------------------------------------------------------

SUBMIT_CASES = {
    # A 2xx we cannot read may have created a task: ambiguous, never resent blindly.
    "html 200": (Canned(200, HTML_PAGE, "text/html"), "ambiguous", "body is not JSON"),
    "no data": (Canned(200, b'{"code":200,"message":"ok"}'), "ambiguous", "no `data`"),
    "data not a prediction": (Canned(200, envelope({"x": 1})), "ambiguous", "malformed"),
    "truncated json": (Canned(200, envelope(prediction())[:30]), "ambiguous", "not JSON"),
    "cut on the wire": (
        Canned(200, envelope(prediction()), cut_after=20),
        "ambiguous",
        "no answer",
    ),
    "json array": (Canned(200, b"[1, 2, 3]"), "ambiguous", "not a JSON object"),
    # An error page from a proxy: retried later, with the page's words in the error.
    "html 502": (Canned(502, HTML_PAGE, "text/html"), "retry", "HTTP 502"),
    "empty 503": (Canned(503, b""), "retry", "HTTP 503"),
    # A refusal whatever its format: failed at once, with the provider's words.
    "html 400": (Canned(400, b"<html>bad image</html>", "text/html"), "failed", "bad image"),
}


@pytest.mark.parametrize("case", SUBMIT_CASES, ids=list(SUBMIT_CASES))
def test_malformed_submit_answers_are_handled_by_rule(
    case: str, deps: Deps, provider: CannedProvider, store: JobStore, settings: Settings
) -> None:
    """Each bad submit answer becomes ambiguous (reconcile), retry (queued) or failed,
    with an error naming the call and what came back; no exception escapes."""
    canned, outcome, fragment = SUBMIT_CASES[case]
    provider.answers["submit"] = canned
    store.create("job1", REQ, now=time.time())
    result = submit_job(deps, "job1")
    assert result.outcome is SubmitOutcome(outcome), result
    assert fragment in result.detail and result.detail.startswith("submit:")
    assert no_secrets(result.detail, settings)
    job = store.get("job1")
    assert job is not None
    if outcome == "ambiguous":
        assert job.state is JobState.SUBMITTING and job.ambiguous
        assert store.redis.zscore(keys.POLL, "job1") is not None  # reconciliation is scheduled
    elif outcome == "retry":
        assert job.state is JobState.QUEUED and job.attempts == 1
    else:
        assert job.state is JobState.FAILED and job.reason == "submit_rejected"
        assert fragment in job.error
    assert provider.calls["submit"] == 1
    # A redelivered message for the same job never POSTs again while it is ambiguous.
    if outcome == "ambiguous":
        assert submit_job(deps, "job1").outcome is not SubmitOutcome.SUBMITTED
        assert provider.calls["submit"] == 1


def test_submit_answer_with_an_unknown_status_is_a_submitted_job(
    deps: Deps, provider: CannedProvider, store: JobStore
) -> None:
    """A well-formed prediction with a status we do not know is not final: the job waits."""
    provider.answers["submit"] = Canned(200, envelope(prediction("warming_up")))
    store.create("job1", REQ, now=time.time())
    assert submit_job(deps, "job1").outcome is SubmitOutcome.SUBMITTED
    job = store.get("job1")
    assert job is not None and job.state is JobState.SUBMITTED and job.prediction_id == PID


# --- polling ------------------------------------------------------------------------------

POLL_CASES = {
    "html 200": (Canned(200, HTML_PAGE, "text/html"), "provider_error"),
    "html 500": (Canned(500, HTML_PAGE, "text/html"), "provider_error"),
    "no data": (Canned(200, b'{"code":200}'), "provider_error"),
    "data null": (Canned(200, envelope(None)), "provider_error"),
    "truncated json": (Canned(200, envelope(prediction("completed"))[:40]), "provider_error"),
    "cut on the wire": (Canned(200, envelope(prediction()), cut_after=10), "provider_error"),
    "completed without outputs": (Canned(200, envelope(prediction("completed"))), "provider_error"),
    "unknown status": (Canned(200, envelope(prediction("quantum"))), "pending"),
}


@pytest.mark.parametrize("case", POLL_CASES, ids=list(POLL_CASES))
def test_malformed_poll_answers_back_off_without_a_crash_loop(
    case: str, deps: Deps, provider: CannedProvider, store: JobStore
) -> None:
    """A bad result answer leaves the job submitted, pushes its next poll into the future
    (a second sweep at once polls nothing), and raises nothing out of the sweep."""
    canned, label = POLL_CASES[case]
    provider.answers["result"] = canned
    submitted_job(store)
    swept_at = deps.clock()
    report = sweep(deps)
    assert report.claimed == 1 and report.outcomes == Counter({label: 1})
    job = store.get("job1")
    assert job is not None and job.state is JobState.SUBMITTED
    next_poll = store.redis.zscore(keys.POLL, "job1")
    assert next_poll is not None and next_poll >= swept_at + deps.settings.poll_min_interval_s
    assert sweep(deps).claimed == 0
    assert provider.calls["result"] == 1
    assert store.events() == []


def test_a_provider_that_never_answers_well_fails_the_job_at_its_deadline(
    deps: Deps, provider: CannedProvider, store: JobStore
) -> None:
    """Polls that only ever get error pages end the job `failed`/`deadline` once the
    deadline passes, with the last provider error as context: never polled forever."""
    assert isinstance(deps.clock, Clock)
    provider.answers["result"] = Canned(502, HTML_PAGE, "text/html")
    submitted_job(store)
    assert sweep(deps).outcomes == Counter({"provider_error": 1})
    deps.clock.advance(deps.settings.job_deadline_s + deps.settings.poll_max_interval_s)
    assert sweep(deps).outcomes == Counter({"deadline": 1})
    job = store.get("job1")
    assert job is not None and job.state is JobState.FAILED and job.reason == "deadline"
    assert "HTTP 502" in job.error
    assert [f["state"] for _, f in store.events()] == ["failed"]
    assert store.redis.zscore(keys.POLL, "job1") is None


def test_a_broken_list_call_keeps_an_ambiguous_job_until_its_deadline(
    deps: Deps, provider: CannedProvider, store: JobStore
) -> None:
    """An ambiguous submit whose reconciliation meets garbage list answers is neither
    resubmitted nor lost: it waits, then fails `submit_ambiguous` at the deadline."""
    assert isinstance(deps.clock, Clock)
    provider.answers["submit"] = Canned(200, HTML_PAGE, "text/html")
    provider.answers["list"] = Canned(200, b'{"code":200,"data":{"items":"nope"}}')
    store.create("job1", REQ, now=time.time())
    assert submit_job(deps, "job1").outcome is SubmitOutcome.AMBIGUOUS
    deps.clock.advance(10)  # past the first reconciliation check, within the deadline
    assert sweep(deps).outcomes == Counter({"provider_error": 1})
    job = store.get("job1")
    assert job is not None and job.state is JobState.SUBMITTING
    deps.clock.advance(deps.settings.job_deadline_s)
    sweep(deps)
    job = store.get("job1")
    assert job is not None and job.state is JobState.FAILED
    assert job.reason == "submit_ambiguous"
    assert provider.calls["submit"] == 1  # never paid twice


# --- producer-side refusals ----------------------------------------------------------------

GOOD = {"prompt": "make it blue", "image": "https://example.com/a.jpg"}
REFUSED = [
    ({"prompt": "x" * 1_000_000}, "prompt"),
    ({"prompt": "p\ud800"}, "prompt"),
    ({"image": "javascript:alert(1)"}, "image"),
    ({"image": "data:image/png;base64,iVBORw0KGgo="}, "image"),
    ({"image": "//example.com/a.jpg"}, "image"),
    ({"image": "https://example.com/" + "a" * 5000}, "image"),
    ({"guidance_scale": float("inf")}, "guidance_scale"),
    ({"guidance_scale": float("-inf")}, "guidance_scale"),
    ({"guidance_scale": 10**400}, "guidance_scale"),
    ({"guidance_scale": "3.5"}, "guidance_scale"),
]


@pytest.mark.parametrize(("patch", "field"), REFUSED, ids=[f for _, f in REFUSED])
def test_producer_refuses_bad_edits_naming_the_field(
    patch: dict[str, object], field: str, store: JobStore, redis_client: redis.Redis
) -> None:
    """Huge prompts, non-http images and non-finite guidance are refused at enqueue with
    the field named; nothing is stored and nothing is sent to the workers."""
    sent: list[list[str]] = []
    producer = Producer(store=store, send=sent.append)
    with pytest.raises(ValidationError) as caught:
        producer.enqueue({**GOOD, **patch})
    assert field in {e.field for e in caught.value.errors}
    assert len(str(caught.value)) < 1000  # a huge value is not echoed back whole
    assert sent == [] and redis_client.keys("kq:*") == []
