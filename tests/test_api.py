"""The producers' HTTP API over real HTTP (werkzeug in a thread) on a private Redis:
auth, validation with field names, size limits, jobs, batches and cancel."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from producer_api.app import create_app
from tests.support import serve_in_thread
from worker.domain import job_id_for_key
from worker.producer import Producer
from worker.service import Deps
from worker.settings import Settings
from worker.store import JobStore
from worker.wavespeed import WaveSpeedClient

TOKEN = "api-token-for-tests-0123456789"
REQ = {"prompt": "make it blue", "image": "https://example.com/a.jpg"}


@pytest.fixture
def api(store: JobStore, settings: Settings) -> Iterator[httpx.Client]:
    sent: list[str] = []
    deps = Deps(store=store, provider=WaveSpeedClient("http://127.0.0.1:9", "k"), settings=settings)
    producer = Producer(store=store, send=sent.extend, deps=deps)
    app = create_app(producer, token=TOKEN, max_batch_bytes=256 * 1024)
    with (
        serve_in_thread(app) as base,
        httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}) as client,
    ):
        yield client


def test_token_required(api: httpx.Client) -> None:
    """Without the right bearer token every call is 401 with a JSON error; healthz is open."""
    for headers in (
        {"Authorization": ""},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
    ):
        response = api.post("/v1/jobs", json=REQ, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
    assert api.get("/healthz", headers={"Authorization": ""}).status_code == 200


def test_create_get_and_cancel_a_job(api: httpx.Client) -> None:
    """POST makes a queued job; GET shows it; cancel moves it; a second cancel is 409."""
    created = api.post("/v1/jobs", json={**REQ, "seed": 4})
    assert created.status_code == 201
    job_id = created.json()["job_id"]
    assert created.headers["Location"] == f"/v1/jobs/{job_id}"
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "queued" and job["request"]["seed"] == 4
    assert api.post(f"/v1/jobs/{job_id}/cancel").json()["state"] == "cancelled"
    assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 409
    assert api.get("/v1/jobs/" + "0" * 32).status_code == 404
    assert api.get("/v1/jobs/not-an-id").status_code == 404


def test_idempotent_job_create(api: httpx.Client) -> None:
    """The same idempotency key twice: 201 then 200, one job."""
    first = api.post("/v1/jobs", json={**REQ, "idempotency_key": "order-1"})
    second = api.post("/v1/jobs", json={**REQ, "idempotency_key": "order-1"})
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["job_id"] == second.json()["job_id"] == job_id_for_key("order-1")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**REQ, "guidance_scale": 0}, "guidance_scale"),
        ({**REQ, "aspect_ratio": "5:4"}, "aspect_ratio"),
        ({"image": "https://e.com/a.jpg"}, "prompt"),
        ({**REQ, "image": "file:///etc/passwd"}, "image"),
        ({**REQ, "color": "red"}, "color"),
        ([REQ], "body"),
    ],
)
def test_validation_errors_name_the_field(api: httpx.Client, body: object, field: str) -> None:
    """Bad input is 422 with the field named; nothing is stored."""
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert field in {f["field"] for f in error["fields"]}


def test_malformed_json_and_size_limits(api: httpx.Client) -> None:
    """Non-JSON is 422 on `body`; an oversized job or batch is 413."""
    bad = api.post("/v1/jobs", content=b"{nope", headers={"Content-Type": "application/json"})
    assert bad.status_code == 422 and bad.json()["error"]["fields"][0]["field"] == "body"
    huge = api.post("/v1/jobs", json={**REQ, "prompt": "x" * 70_000})
    assert huge.status_code == 413
    lines = (json.dumps(REQ) + "\n") * 5000  # ~300 KB > the 256 KB test limit
    assert api.post("/v1/batches", content=lines.encode()).status_code == 413


def test_batch_jsonl_and_array(api: httpx.Client, store: JobStore) -> None:
    """A JSONL or JSON-array body becomes a batch; its progress is readable."""
    jsonl = "".join(json.dumps({**REQ, "prompt": f"p{i}"}) + "\n" for i in range(5))
    created = api.post("/v1/batches?batch_id=api-1&budget_usd=1.5", content=jsonl.encode())
    assert created.status_code == 201, created.text
    assert created.json()["created"] == 5
    progress = api.get("/v1/batches/api-1").json()
    assert progress["total"] == 5 and progress["queued"] == 5 and progress["budget_usd"] == 1.5
    array = api.post("/v1/batches", json=[REQ, REQ])
    assert array.status_code == 201 and array.json()["created"] == 2
    assert api.get("/v1/batches/nope").status_code == 404


def test_batch_retry_with_batch_id_resumes(api: httpx.Client) -> None:
    """Posting the same named batch again creates nothing new."""
    body = "".join(json.dumps({**REQ, "prompt": f"r{i}"}) + "\n" for i in range(4)).encode()
    assert api.post("/v1/batches?batch_id=same", content=body).json()["created"] == 4
    again = api.post("/v1/batches?batch_id=same", content=body).json()
    assert again["created"] == 0 and again["existing"] == 4


def test_batch_with_a_bad_line_enqueues_nothing(api: httpx.Client, store: JobStore) -> None:
    """All-or-nothing: one bad line is 422 naming line and field; no job is written."""
    body = (json.dumps(REQ) + "\n" + json.dumps({**REQ, "seed": -5}) + "\n").encode()
    response = api.post("/v1/batches?batch_id=bad", content=body)
    assert response.status_code == 422
    assert response.json()["error"]["fields"][0]["field"] == "line 2: seed"
    assert store.redis.keys("kq:job:*") == []


def test_openapi_file_describes_every_route(store: JobStore) -> None:
    """docs/openapi.yaml parses and lists exactly the routes the app serves."""
    from pathlib import Path

    import yaml

    spec = yaml.safe_load(Path("docs/openapi.yaml").read_text())
    assert spec["openapi"].startswith("3.")
    app = create_app(Producer(store=store, send=lambda ids: None), token=TOKEN)
    served = {
        (rule.rule.replace("<", "{").replace(">", "}"), method.lower())
        for rule in app.url_map.iter_rules()
        for method in rule.methods or ()
        if method in ("GET", "POST") and not rule.rule.startswith("/static")
    }
    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    assert served == documented
