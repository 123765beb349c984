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


# --- issue 12: a complete API that matches its description --------------------------------


def test_a_reposted_job_and_a_reposted_batch_answer_alike(api: httpx.Client) -> None:
    """201 with created 1 / existing 0, then 200 with created 0 / existing 1: for a job
    (same idempotency key) and for a batch (same batch_id) alike."""
    job = {**REQ, "idempotency_key": "shape-1"}
    first, again = api.post("/v1/jobs", json=job), api.post("/v1/jobs", json=job)
    assert (first.status_code, again.status_code) == (201, 200)
    assert (first.json()["created"], first.json()["existing"]) == (1, 0)
    assert (again.json()["created"], again.json()["existing"]) == (0, 1)
    assert again.headers["Location"] == first.headers["Location"]
    body = "".join(json.dumps({**REQ, "prompt": f"s{i}"}) + "\n" for i in range(3)).encode()
    made = api.post("/v1/batches?batch_id=shape", content=body)
    redo = api.post("/v1/batches?batch_id=shape", content=body)
    assert (made.status_code, redo.status_code) == (201, 200)
    assert (made.json()["created"], made.json()["existing"]) == (3, 0)
    assert (redo.json()["created"], redo.json()["existing"]) == (0, 3)
    assert made.json()["job_ids"] == redo.json()["job_ids"]
    for answer in (first, again, made, redo):
        assert {"created", "existing", "resent"} <= set(answer.json())


def test_batch_receipt_maps_items_to_jobs(api: httpx.Client) -> None:
    """job_ids[i] is the job of item i+1; a line's own idempotency_key counts even
    without a batch_id; each job carries its key and metadata."""
    items = [
        {**REQ, "prompt": "first"},
        {**REQ, "prompt": "second", "idempotency_key": "order-2", "metadata": {"order": 2}},
        {**REQ, "prompt": "third"},
    ]
    receipt = api.post("/v1/batches", json=items).json()
    assert receipt["job_ids"][1] == job_id_for_key("order-2")
    for item, job_id in zip(items, receipt["job_ids"], strict=True):
        job = api.get(f"/v1/jobs/{job_id}").json()
        assert job["request"]["prompt"] == item["prompt"]
        assert job["batch_id"] == receipt["batch_id"]
        assert job["metadata"] == item.get("metadata")
        assert job["idempotency_key"] == item.get("idempotency_key", "")
    named = api.post("/v1/batches?batch_id=named", json=items[:1]).json()
    made_up = api.get(f"/v1/jobs/{named['job_ids'][0]}").json()["idempotency_key"]
    assert made_up.startswith("named:1:")  # batch id, line number, hash of the line


def test_batch_jobs_paged_and_filtered(api: httpx.Client) -> None:
    """GET /v1/batches/{id}/jobs walks the batch in item order by cursor; state filters;
    bad parameters are 422 naming every one; an unknown batch is 404."""
    items = [{**REQ, "prompt": f"j{i}"} for i in range(7)]
    ids = api.post("/v1/batches?batch_id=pg", json=items).json()["job_ids"]
    for job_id in (ids[1], ids[5]):
        assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    seen: list[str] = []
    params: dict[str, str] = {"limit": "3"}
    while True:
        page = api.get("/v1/batches/pg/jobs", params=params).json()
        assert page["batch_id"] == "pg" and len(page["jobs"]) <= 3
        seen += [job["id"] for job in page["jobs"]]
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
    assert seen == ids
    cancelled = api.get("/v1/batches/pg/jobs", params={"state": "cancelled"}).json()
    assert [j["id"] for j in cancelled["jobs"]] == [ids[1], ids[5]]
    assert cancelled["next_cursor"] is None
    assert all(j["state"] == "cancelled" and j["finished_at"] > 0 for j in cancelled["jobs"])
    bad = api.get("/v1/batches/pg/jobs", params={"limit": "0", "cursor": "x", "state": "gone"})
    assert bad.status_code == 422
    assert {f["field"] for f in bad.json()["error"]["fields"]} == {"limit", "cursor", "state"}
    twice = api.get("/v1/batches/pg/jobs?limit=1&limit=2")
    assert twice.status_code == 422 and twice.json()["error"]["fields"][0]["field"] == "limit"
    assert api.get("/v1/batches/nope/jobs").status_code == 404


def test_job_json_has_nulls_and_numbers(api: httpx.Client) -> None:
    """Unknown times are null (not 0.0), counts are numbers, metadata comes back as given."""
    meta = {"order": 17, "lines": [1, 2], "note": "ü"}
    job_id = api.post("/v1/jobs", json={**REQ, "metadata": meta}).json()["job_id"]
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["metadata"] == meta
    for name in ("submitting_at", "submitted_at", "finished_at", "seconds"):
        assert job[name] is None, name
    assert isinstance(job["created_at"], float)
    for name in ("attempts", "version", "priority", "poll_count"):
        assert type(job[name]) is int, name
    assert job["task_code"] is None and job["outputs"] == []


def test_every_problem_of_a_request_is_named(api: httpx.Client) -> None:
    """One 422 names all bad fields; the unknown field's message lists every accepted one;
    too much metadata is a clear field error."""
    response = api.post(
        "/v1/jobs",
        json={"image": "ftp://x", "seed": -5, "aspect_ratio": "5:4", "color": 1, "batch_id": ""},
    )
    assert response.status_code == 422
    fields = {f["field"]: f["message"] for f in response.json()["error"]["fields"]}
    assert set(fields) == {"prompt", "image", "seed", "aspect_ratio", "color", "batch_id"}
    for name in ("idempotency_key", "priority", "metadata", "batch_id", "guidance_scale"):
        assert name in fields["color"]
    big = api.post("/v1/jobs", json={**REQ, "metadata": {"k": "x" * 5000}})
    assert big.status_code == 422
    assert big.json()["error"]["fields"] == [
        {"field": "metadata", "message": "is 5008 bytes as JSON; at most 4096"}
    ]
    line = json.dumps({"prompt": " ", "image": "https://e.com/a.jpg", "batch_id": "b", "x": 1})
    batch = api.post("/v1/batches", content=line.encode()).json()["error"]["fields"]
    assert {f["field"] for f in batch} == {"line 1: prompt", "line 1: batch_id", "line 1: x"}


def test_werkzeug_errors_are_json_with_their_headers(api: httpx.Client) -> None:
    """404 for an unknown path, 405 with `Allow`, a binary batch body refused once."""
    missing = api.get("/v1/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = api.put("/v1/jobs/" + "0" * 32)
    assert wrong.status_code == 405
    assert "GET" in wrong.headers["Allow"]
    assert wrong.json()["error"]["code"] == "method_not_allowed"
    binary = api.post("/v1/batches", content=b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 10)
    assert binary.status_code == 422
    (field,) = binary.json()["error"]["fields"]
    assert field["field"] == "body" and "not a text file" in field["message"]
    bom = api.post("/v1/batches", content=b"\xef\xbb\xbf" + json.dumps([REQ]).encode())
    assert bom.status_code == 201, bom.text
