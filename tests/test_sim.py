"""The WaveSpeed simulator, over real HTTP: API, lifecycle, webhooks, faults, SDK, CLI.

One simulator runs for the whole module on a free port; every test starts from
``POST /_sim/reset`` (the start config, no tasks) and patches the knobs it needs. A tiny
werkzeug server plays the webhook receiver. Waits poll a condition until a deadline.
"""

from __future__ import annotations

import io
import itertools
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import wavespeed
from PIL import Image
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from wavespeed_sim.cli import build_parser
from wavespeed_sim.config import MODEL, MODEL_MULTI, SimConfig
from wavespeed_sim.server import SimServer
from wavespeed_sim.signing import sign, verify

IMAGE = "https://example.com/source.png"
HEX32 = re.compile(r"^[0-9a-f]{32}$")
CREATED_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")
WEEK_S = 7 * 86_400
T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], timeout: float = 5.0, what: str = "condition") -> T:
    """Poll ``probe`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


# --- the webhook receiver -----------------------------------------------------------------


@dataclass
class Call:
    """One webhook as the receiver saw it."""

    raw_uri: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> dict[str, Any]:
        """The body, parsed."""
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


class _Quiet(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """No access log."""


HANG = 0  # in a status script: answer nothing until released (a receiver that times out)


class Receiver:
    """Records every POST; answers 200 unless a status script for the path says otherwise."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.release = threading.Event()
        self.calls: list[Call] = []
        self.scripts: dict[str, list[int]] = {}
        self._server: BaseWSGIServer = make_server(
            "127.0.0.1", 0, self._app, threaded=True, request_handler=_Quiet
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.port}"

    def _app(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        call = Call(environ["RAW_URI"], dict(request.headers), request.get_data(), time.time())
        with self._lock:
            self.calls.append(call)
            script = self.scripts.get(request.path, [])
            status = script.pop(0) if script else 200
        if status == HANG:
            self.release.wait(timeout=5.0)
            status = 200
        return Response("ok", status=status)(environ, start_response)

    def received(self, count: int, timeout: float = 5.0) -> list[Call]:
        """Wait until at least ``count`` calls arrived; return them all."""
        return wait_for(lambda: list(self.calls) if len(self.calls) >= count else None, timeout)

    def reset(self) -> None:
        """Forget calls and scripts."""
        self.release.set()
        with self._lock:
            self.calls.clear()
            self.scripts.clear()
        self.release = threading.Event()

    def start(self) -> None:
        """Serve in a thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop and close the socket."""
        self.release.set()
        self._server.shutdown()
        self._thread.join()
        self._server.server_close()


# --- the client side ----------------------------------------------------------------------


class Api:
    """A thin httpx client for the simulator's API and control endpoints."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = httpx.Client(
            base_url=base,
            trust_env=False,
            timeout=10.0,
            headers={"Authorization": "Bearer test-key"},
        )

    def submit(
        self, body: dict[str, Any], *, webhook: str | None = None, model: str = MODEL
    ) -> httpx.Response:
        """POST a submit; the webhook goes URL-encoded in the query."""
        params = {"webhook": webhook} if webhook else None
        return self.http.post(f"/api/v3/{model}", json=body, params=params)

    def created(self, body: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
        """Submit a valid edit; return the created prediction."""
        return data(
            self.submit(body or {"prompt": "make the sky purple", "image": IMAGE}, **kwargs)
        )

    def result(self, task_id: str) -> httpx.Response:
        """GET the prediction."""
        return self.http.get(f"/api/v3/predictions/{task_id}/result")

    def wait_status(self, task_id: str, *statuses: str, timeout: float = 5.0) -> dict[str, Any]:
        """Poll the result until its status is one of ``statuses``."""

        def probe() -> dict[str, Any] | None:
            prediction = data(self.result(task_id))
            return prediction if prediction["status"] in statuses else None

        return wait_for(probe, timeout, f"{task_id} to be {statuses}")

    def patch(self, **knobs: Any) -> dict[str, Any]:
        """Patch simulator knobs."""
        response = self.http.post("/_sim/config", json=knobs)
        assert response.status_code == 200, response.text
        patched: dict[str, Any] = response.json()
        return patched

    def tasks(self) -> list[dict[str, Any]]:
        """Ground truth: every task."""
        found: list[dict[str, Any]] = self.http.get("/_sim/tasks").json()["tasks"]
        return found

    def task(self, task_id: str) -> dict[str, Any]:
        """Ground truth: one task."""
        found: dict[str, Any] = self.http.get(f"/_sim/tasks/{task_id}").json()
        return found

    def requests(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The request log."""
        params = {"kind": kind} if kind else {}
        found: list[dict[str, Any]] = self.http.get("/_sim/requests", params=params).json()[
            "requests"
        ]
        return found

    def balance(self) -> float:
        """The account balance."""
        return float(data(self.http.get("/api/v3/balance"))["balance"])


def data(response: httpx.Response) -> dict[str, Any]:
    """Check a success envelope; return its data."""
    assert response.status_code == 200, response.text
    envelope = response.json()
    assert envelope["code"] == 200 and envelope["message"] == "success", envelope
    found: dict[str, Any] = envelope["data"]
    return found


def delivery_states(api: Api, task_id: str) -> list[str]:
    """Ground truth: the state of each webhook delivery of a task."""
    return [d["state"] for d in api.task(task_id)["deliveries"]]


def failure(response: httpx.Response, status: int) -> str:
    """Check an error envelope with ``status``; return its message."""
    assert response.status_code == status, response.text
    envelope = response.json()
    assert envelope["code"] == status and envelope["data"] is None, envelope
    message: str = envelope["message"]
    return message


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    """The webhook receiver (outlives the simulator, so no delivery hits a closed port)."""
    server = Receiver()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(receiver: Receiver) -> Iterator[SimServer]:
    """One simulator for the module, with short times."""
    config = SimConfig(
        port=0,
        seed=1234,
        inference_time_s=0.2,
        webhook_retry_base_s=0.05,
        webhook_timeout_s=2.0,
    )
    sim = SimServer(config).start()
    yield sim
    sim.stop()


@pytest.fixture
def api(server: SimServer, receiver: Receiver) -> Iterator[Api]:
    """A client on a freshly reset simulator and receiver."""
    client = Api(server.url)
    assert client.http.post("/_sim/reset").status_code == 200
    receiver.reset()
    yield client
    client.http.close()


# --- signature ----------------------------------------------------------------------------

VECTOR_SECRET = "whsec_dGVzdC1zZWNyZXQtZm9yLXNpbXVsYXRvci0xMjM0NTY="
VECTOR_ID = "0123456789abcdef0123456789abcdef"
VECTOR_BODY = (
    b'{"id":"0123456789abcdef0123456789abcdef","model":"wavespeed-ai/flux-kontext-max",'
    b'"outputs":["https://example.invalid/o.jpeg"],"urls":{"get":"https://api.wavespeed.ai'
    b'/api/v3/predictions/0123456789abcdef0123456789abcdef/result"},"has_nsfw_contents":'
    b'[false],"status":"completed","created_at":"2023-11-14T22:13:20.000Z","error":"",'
    b'"executionTime":4200,"timings":{"inference":4200}}'
)
VECTOR_HEADER = "v3,86ff6619aa927042e6a23c8e03bc85c151a7bfd0f9067bb17901ce283a03eaf0"


def test_signature_matches_the_spec_test_vector() -> None:
    """Signing the spec's vector gives its header; verify accepts it and rejects tampering."""
    assert sign(VECTOR_SECRET, VECTOR_ID, 1700000000, VECTOR_BODY) == VECTOR_HEADER
    now = 1700000000 + 10
    assert verify(VECTOR_SECRET, VECTOR_ID, "1700000000", VECTOR_BODY, VECTOR_HEADER, now=now)
    assert not verify(
        VECTOR_SECRET, VECTOR_ID, "1700000000", VECTOR_BODY + b" ", VECTOR_HEADER, now=now
    )
    assert not verify(
        VECTOR_SECRET, VECTOR_ID, "1700000000", VECTOR_BODY, VECTOR_HEADER, now=now + 400
    )


# --- envelope, auth, validation -----------------------------------------------------------


def test_envelope_and_auth(api: Api) -> None:
    """No key or an empty key is 401 in the envelope; any key works until one is configured."""
    bare = httpx.Client(base_url=api.base, trust_env=False)
    try:
        assert "key" in failure(bare.get("/api/v3/balance"), 401)
        empty = {"Authorization": "Bearer"}
        failure(bare.get("/api/v3/balance", headers=empty), 401)
        failure(bare.post(f"/api/v3/{MODEL}", json={}), 401)
        assert data(bare.get("/api/v3/balance", headers={"Authorization": "Bearer x"})) == {
            "balance": 1000.0
        }
        api.patch(api_key="the-right-key")
        failure(api.http.get("/api/v3/balance"), 401)
        right = {"Authorization": "Bearer the-right-key"}
        assert data(bare.get("/api/v3/balance", headers=right))["balance"] == 1000.0
        assert api.requests("balance")[0]["status"] == 401
    finally:
        bare.close()


@pytest.mark.parametrize(
    ("model", "body", "field"),
    [
        (MODEL, {"image": IMAGE}, "prompt"),
        (MODEL, {"prompt": "", "image": IMAGE}, "prompt"),
        (MODEL, {"prompt": 7, "image": IMAGE}, "prompt"),
        (MODEL, {"prompt": "p"}, "image"),
        (MODEL, {"prompt": "p", "image": "ftp://example.com/a.png"}, "image"),
        (MODEL, {"prompt": "p", "image": "not a url"}, "image"),
        (MODEL, {"prompt": "p", "image": ["https://a.b/c"]}, "image"),
        (MODEL, {"prompt": "p", "image": IMAGE, "seed": True}, "seed"),
        (MODEL, {"prompt": "p", "image": IMAGE, "seed": 2147483648}, "seed"),
        (MODEL, {"prompt": "p", "image": IMAGE, "seed": -2}, "seed"),
        (MODEL, {"prompt": "p", "image": IMAGE, "seed": 1.5}, "seed"),
        (MODEL, {"prompt": "p", "image": IMAGE, "seed": "3"}, "seed"),
        (MODEL, {"prompt": "p", "image": IMAGE, "guidance_scale": 0.5}, "guidance_scale"),
        (MODEL, {"prompt": "p", "image": IMAGE, "guidance_scale": 20.01}, "guidance_scale"),
        (MODEL, {"prompt": "p", "image": IMAGE, "guidance_scale": "3.5"}, "guidance_scale"),
        (MODEL, {"prompt": "p", "image": IMAGE, "guidance_scale": True}, "guidance_scale"),
        (MODEL, {"prompt": "p", "image": IMAGE, "aspect_ratio": "5:4"}, "aspect_ratio"),
        (MODEL, {"prompt": "p", "image": IMAGE, "enable_sync_mode": "true"}, "enable_sync_mode"),
        (MODEL, {"prompt": "p", "image": IMAGE, "enable_sync_mode": 1}, "enable_sync_mode"),
        (MODEL_MULTI, {"prompt": "p", "image": IMAGE}, "images"),
        (MODEL_MULTI, {"prompt": "p", "images": []}, "images"),
        (MODEL_MULTI, {"prompt": "p", "images": [IMAGE, "nope"]}, "images[1]"),
    ],
)
def test_bad_params_are_400_naming_the_field(
    api: Api, model: str, body: dict[str, Any], field: str
) -> None:
    """Each invalid parameter answers 400 with a message that starts with the field's name."""
    message = failure(api.submit(body, model=model), 400)
    assert message.startswith(f"{field}:"), message
    assert api.tasks() == []
    assert api.balance() == 1000.0


def test_bad_webhook_and_bad_json_are_400(api: Api) -> None:
    """A webhook that is not an http(s) URL, or a body that is not JSON, is refused."""
    response = api.submit({"prompt": "p", "image": IMAGE}, webhook="javascript:alert(1)")
    assert failure(response, 400).startswith("webhook:")
    broken = api.http.post(f"/api/v3/{MODEL}", content=b"{nope")
    assert failure(broken, 400).startswith("body:")


def test_edge_values_and_unknown_fields_are_accepted(api: Api) -> None:
    """Boundary values pass, unknown fields are ignored, multi ignores a seed."""
    for extra in (
        {"seed": -1, "guidance_scale": 1, "aspect_ratio": "21:9"},
        {"seed": 2147483647, "guidance_scale": 20.0, "aspect_ratio": "9:21"},
        {"enable_sync_mode": False, "some_future_field": {"x": 1}, "seed": None},
    ):
        api.created({"prompt": "p", "image": IMAGE, **extra})
    multi = api.created(
        {"prompt": "p", "images": [IMAGE, IMAGE], "seed": "ignored"}, model=MODEL_MULTI
    )
    assert multi["model"] == MODEL_MULTI
    assert "some_future_field" not in api.tasks()[2]["params"]


# --- lifecycle ----------------------------------------------------------------------------


def test_lifecycle_created_processing_completed(api: Api, server: SimServer) -> None:
    """A task is created at once, then processing, then completed with a real JPEG output."""
    api.patch(queue_delay_s=0.15, inference_time_s=0.3)
    created = api.created()
    assert created["status"] == "created" and HEX32.match(created["id"])
    assert CREATED_AT.match(created["created_at"])
    assert created["urls"]["get"] == f"{server.url}/api/v3/predictions/{created['id']}/result"
    assert created["outputs"] == [] and created["model"] == MODEL

    seen: list[str] = []

    def probe() -> dict[str, Any] | None:
        prediction = data(api.result(created["id"]))
        if not seen or seen[-1] != prediction["status"]:
            seen.append(prediction["status"])
        return prediction if prediction["status"] == "completed" else None

    done = wait_for(probe, what="completion")
    assert seen == ["created", "processing", "completed"]
    assert done["outputs"] == [f"{server.url}/outputs/{created['id']}.jpeg"]
    assert done["has_nsfw_contents"] == [False]
    assert done["error"] == "" and "code" not in done
    assert 250 <= done["executionTime"] == done["timings"]["inference"] < 2000
    image = api.http.get(done["outputs"][0])
    assert image.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(image.content)) as picture:
        assert picture.format == "JPEG" and picture.size == (512, 384)


def test_concurrency_cap_queues_tasks(api: Api) -> None:
    """With concurrency 1, tasks wait as 'created' and run one after another."""
    api.patch(concurrency=1, inference_time_s=0.4)
    ids = [api.created()["id"] for _ in range(3)]
    api.wait_status(ids[0], "processing")
    assert [data(api.result(i))["status"] for i in ids[1:]] == ["created", "created"]
    for task_id in ids:
        api.wait_status(task_id, "completed")
    runs = sorted((t["started_at"], t["finished_at"]) for t in api.tasks())
    for (_, finished), (started, _) in itertools.pairwise(runs):
        assert started >= finished - 0.01  # never two at once


def test_inference_jitter_spreads_task_times_and_shifts_no_fault(api: Api) -> None:
    """--inference-jitter: each task takes inference_time +- up to the jitter, drawn from
    its own seeded stream, so the same seed fails the same tasks with or without it."""

    def run(jitter_s: float) -> tuple[list[float], list[str]]:
        api.http.post("/_sim/reset").raise_for_status()
        api.patch(seed=99, fail_rate=0.5, inference_time_s=0.3, inference_jitter_s=jitter_s)
        ids = [api.created()["id"] for _ in range(24)]
        ended = [api.wait_status(i, "completed", "failed") for i in ids]
        truth = {t["id"]: t for t in api.tasks()}
        took = [truth[i]["finished_at"] - truth[i]["started_at"] for i in ids]
        return took, [e["status"] for e in ended]

    steady, statuses = run(0.0)
    spread, jittered_statuses = run(0.2)
    assert all(0.29 <= t <= 0.45 for t in steady)
    assert all(0.09 <= t <= 0.65 for t in spread)
    assert min(spread) < 0.2 and max(spread) > 0.4  # spread over the range, not one value
    assert jittered_statuses == statuses and "failed" in statuses and "completed" in statuses


def test_rate_limit_429_creates_no_task(api: Api) -> None:
    """Over the per-minute limit a submit is 429 with Retry-After, no task and no debit."""
    api.patch(rate_limit_per_minute=2)
    api.created()
    api.created()
    refused = api.submit({"prompt": "p", "image": IMAGE})
    assert "rate limit" in failure(refused, 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert len(api.tasks()) == 2
    assert api.balance() == pytest.approx(1000.0 - 0.16)
    assert [r["fault"] for r in api.requests("submit")] == [None, None, "rate_limit"]


def test_result_of_unknown_id_is_404(api: Api) -> None:
    """An id the simulator never issued answers 404 in the envelope."""
    assert "not found" in failure(api.result("0" * 32), 404)


def test_failed_task_reports_its_code(api: Api) -> None:
    """A failed task is HTTP 200 with status failed, an error and the task code."""
    api.patch(fail_rate=1.0, fail_codes=[1402], inference_time_s=0.05)
    failed = api.wait_status(api.created()["id"], "failed")
    assert failed["code"] == 1402 and failed["error"] and failed["outputs"] == []


def test_sync_mode_answers_when_done_or_5004(api: Api) -> None:
    """enable_sync_mode blocks until the end; past the sync timeout it answers code 5004."""
    body = {"prompt": "p", "image": IMAGE, "enable_sync_mode": True}
    done = data(api.submit(body))
    assert done["status"] == "completed" and len(done["outputs"]) == 1
    api.patch(sync_timeout_s=0.2, inference_time_s=3.0)
    pending = data(api.submit(body))
    assert pending["status"] == "processing" and pending["code"] == 5004


# --- list, delete, balance, expiry --------------------------------------------------------


def test_list_is_newest_first_with_filters(api: Api) -> None:
    """List pages newest first, filters by status/model/time, caps page_size at 100."""
    api.patch(inference_time_s=30.0, concurrency=1)
    ids = [api.created()["id"] for _ in range(3)]
    api.wait_status(ids[0], "processing")

    def listing(**body: Any) -> dict[str, Any]:
        return data(api.http.post("/api/v3/predictions", json=body))

    first = listing(page=1, page_size=2)
    assert [p["id"] for p in first["items"]] == [ids[2], ids[1]]
    assert (first["page"], first["page_size"], first["total"]) == (1, 2, 3)
    assert [p["id"] for p in listing(page=2, page_size=2)["items"]] == [ids[0]]
    assert [p["id"] for p in listing(status="processing")["items"]] == [ids[0]]
    assert listing(model=MODEL_MULTI)["total"] == 0
    assert listing(model=MODEL, created_after="2999-01-01T00:00:00Z")["total"] == 0
    assert listing(created_before="2000-01-01T00:00:00.000000000Z")["total"] == 0
    too_big = api.http.post("/api/v3/predictions", json={"page_size": 101})
    assert failure(too_big, 400).startswith("page_size:")


def test_delete_cancels_unfinished_and_removes_finished(api: Api, receiver: Receiver) -> None:
    """Deleting a running task makes it 'deleted' with no webhook; a finished one goes 404."""
    hook = f"{receiver.url}/hook"
    api.patch(inference_time_s=0.05)
    finished = api.created(webhook=hook)["id"]
    api.wait_status(finished, "completed")
    receiver.received(1)
    api.patch(inference_time_s=1.0)  # long enough that the delete surely comes first
    running = api.created(webhook=hook)["id"]

    def delete(*ids: str) -> int:
        return int(
            data(api.http.post("/api/v3/predictions/delete", json={"ids": list(ids)}))[
                "deleted_count"
            ]
        )

    assert delete(running, "f" * 32) == 1
    deleted = data(api.result(running))
    assert deleted["status"] == "deleted" and deleted["outputs"] == []
    assert delete(running) == 0
    # A task submitted after it, with the same inference time, ends after it would have:
    # by then the deleted one has still sent nothing.
    later = api.created(webhook=hook)["id"]
    receiver.received(2)
    assert [c.json()["id"] for c in receiver.calls] == [finished, later]
    assert api.task(running)["status"] == "deleted" and api.task(running)["deliveries"] == []

    output = data(api.result(finished))["outputs"][0]
    assert delete(finished) == 1
    failure(api.result(finished), 404)
    assert api.http.get(output).status_code == 404
    ids = [p["id"] for p in data(api.http.post("/api/v3/predictions", json={}))["items"]]
    assert ids == [later, running]
    assert failure(api.http.post("/api/v3/predictions/delete", json={}), 400).startswith("ids:")


def test_balance_debits_and_402(api: Api) -> None:
    """Each task costs $0.08; below that a submit is 402 and creates nothing."""
    api.patch(balance=0.1)
    api.created()
    assert api.balance() == pytest.approx(0.02)
    assert "balance" in failure(api.submit({"prompt": "p", "image": IMAGE}), 402)
    assert len(api.tasks()) == 1


def test_clock_advance_expires_after_seven_days(api: Api) -> None:
    """After 7 days on the sim clock a task's result, list entry and output are gone."""
    api.patch(inference_time_s=0.05)
    task_id = api.created()["id"]
    output = api.wait_status(task_id, "completed")["outputs"][0]
    api.http.post("/_sim/clock/advance", json={"seconds": WEEK_S - 60})
    assert data(api.result(task_id))["status"] == "completed"
    advanced = api.http.post("/_sim/clock/advance", json={"seconds": 120}).json()
    assert advanced["offset_s"] == pytest.approx(WEEK_S + 60)
    failure(api.result(task_id), 404)
    assert data(api.http.post("/api/v3/predictions", json={}))["total"] == 0
    assert api.http.get(output).status_code == 404
    assert api.task(task_id)["expired"] is True


# --- webhooks -----------------------------------------------------------------------------


def test_webhook_is_signed_and_sent_to_the_exact_url(api: Api, receiver: Receiver) -> None:
    """The final webhook reaches the URL as given (query intact), signed v3, compact JSON."""
    path = "/webhooks/wavespeed?job=abc&t=tok%2F1"
    task_id = api.created(webhook=receiver.url + path)["id"]
    [call] = receiver.received(1)
    assert call.raw_uri == path
    secret = data(api.http.get("/api/v3/webhook/secret"))["secret"]
    assert secret.startswith("whsec_")
    headers = call.headers
    assert HEX32.match(headers["Webhook-Id"])
    assert abs(int(headers["Webhook-Timestamp"]) - time.time()) < 5
    assert headers["Content-Type"] == "application/json"
    assert verify(
        secret,
        headers["Webhook-Id"],
        headers["Webhook-Timestamp"],
        call.body,
        headers["Webhook-Signature"],
    )
    body = call.json()
    assert call.body == json.dumps(body, separators=(",", ":")).encode()
    # The webhook body is the prediction plus the echoed `input` (see the identity test).
    without_input = {k: v for k, v in body.items() if k != "input"}
    assert without_input == data(api.result(task_id)) and body["status"] == "completed"
    assert api.requests("submit")[0]["query"]["webhook"] == receiver.url + path
    truth = wait_for(lambda: (t := api.task(task_id))["deliveries_acknowledged"] == 1 and t)
    assert truth["webhook"] == receiver.url + path and truth["deliveries_attempted"] == 1


def test_only_the_webhook_says_which_job_a_task_is(api: Api, receiver: Receiver) -> None:
    """Identity as the provider shows it: the webhook body echoes ``input`` (the parameters
    as submitted); list items and GET result carry neither ``input`` nor the webhook URL."""
    submitted = {
        "prompt": "make the sky purple",
        "image": IMAGE,
        "seed": 42,
        "guidance_scale": 4.5,
        "aspect_ratio": "16:9",
    }
    hook = f"{receiver.url}/webhooks/wavespeed?job=job-identity&t=tok"
    task_id = api.created(submitted, webhook=hook)["id"]
    [call] = receiver.received(1)
    body = call.json()
    assert body["id"] == task_id and body["status"] == "completed"
    assert body["input"] == submitted

    result = data(api.result(task_id))
    listed = data(api.http.post("/api/v3/predictions", json={"page": 1, "page_size": 100}))
    [item] = [p for p in listed["items"] if p["id"] == task_id]
    for prediction in (result, item):
        assert "input" not in prediction
        assert "webhook" not in json.dumps(prediction)
        assert {k: v for k, v in body.items() if k != "input"} == prediction


def test_failed_task_webhook_is_sent_too(api: Api, receiver: Receiver) -> None:
    """A failed task also gets its one webhook, carrying status, error and code."""
    api.patch(fail_rate=1.0, fail_codes=[1200], inference_time_s=0.05)
    api.created(webhook=f"{receiver.url}/hook")
    [call] = receiver.received(1)
    body = call.json()
    assert (body["status"], body["code"]) == ("failed", 1200) and "moderation" in body["error"]


def test_webhook_retries_three_times_then_gives_up(api: Api, receiver: Receiver) -> None:
    """A receiver answering 500 gets 1 + 3 attempts, same id, backing off, then nothing."""
    receiver.scripts["/down"] = [500] * 10
    task_id = api.created(webhook=f"{receiver.url}/down")["id"]
    wait_for(lambda: delivery_states(api, task_id) == ["given_up"], what="give-up")
    calls = list(receiver.calls)
    assert len(calls) == 4
    assert len({c.headers["Webhook-Id"] for c in calls}) == 1
    gaps = [b.at - a.at for a, b in itertools.pairwise(calls)]
    assert gaps[0] >= 0.04 and gaps[1] >= 0.09 and gaps[2] >= 0.18  # base 0.05: 1x, 2x, 4x
    assert api.http.get("/_sim/health").json()["pending_deliveries"] == 0
    assert api.task(task_id)["deliveries_attempted"] == 4


def test_webhook_retry_succeeds_after_errors(api: Api, receiver: Receiver) -> None:
    """Two failures then a 2xx: three attempts, acknowledged."""
    receiver.scripts["/flaky"] = [503, 404]
    task_id = api.created(webhook=f"{receiver.url}/flaky")["id"]
    receiver.received(3)
    truth = wait_for(lambda: (t := api.task(task_id))["deliveries_acknowledged"] == 1 and t)
    assert [a["status_code"] for a in truth["deliveries"][0]["attempts"]] == [503, 404, 200]


def test_webhook_receiver_that_never_answers_is_retried(api: Api, receiver: Receiver) -> None:
    """No answer within webhook_timeout_s counts as a failure and is retried."""
    api.patch(webhook_timeout_s=0.2, webhook_retries=1)
    receiver.scripts["/slow"] = [HANG, HANG]
    task_id = api.created(webhook=f"{receiver.url}/slow")["id"]
    wait_for(lambda: delivery_states(api, task_id) == ["given_up"], what="give-up")
    attempts = api.task(task_id)["deliveries"][0]["attempts"]
    assert [a["status_code"] for a in attempts] == [None, None]
    assert all("Timeout" in a["error"] for a in attempts)


def test_dropped_and_duplicated_webhooks(api: Api, receiver: Receiver) -> None:
    """Drop: the task completes and nothing is ever sent. Duplicate: same id, twice."""
    api.patch(drop_webhook_rate=1.0)
    dropped = api.created(webhook=f"{receiver.url}/hook")["id"]
    api.wait_status(dropped, "completed")
    truth = api.task(dropped)
    assert truth["faults"]["drop_webhook"] is True and truth["deliveries"] == []

    api.patch(drop_webhook_rate=0.0, duplicate_webhook_rate=1.0)
    doubled = api.created(webhook=f"{receiver.url}/hook")["id"]
    first, second = receiver.received(2)
    assert first.headers["Webhook-Id"] == second.headers["Webhook-Id"]
    assert first.body == second.body and first.json()["id"] == doubled
    assert [c.json()["id"] for c in receiver.calls] == [doubled, doubled]


def test_late_failed_bad_signature_and_stale_timestamp(api: Api, receiver: Receiver) -> None:
    """A contradictory 'failed' follows the 'completed'; bad signatures and stale times fail."""
    api.patch(late_failed_rate=1.0, bad_signature_rate=1.0, stale_timestamp_rate=1.0)
    api.created(webhook=f"{receiver.url}/hook")
    completed, late = receiver.received(2)
    assert (completed.json()["status"], late.json()["status"]) == ("completed", "failed")
    assert completed.headers["Webhook-Id"] != late.headers["Webhook-Id"]
    assert completed.json()["id"] == late.json()["id"]
    secret = data(api.http.get("/api/v3/webhook/secret"))["secret"]
    for call in (completed, late):
        h = call.headers
        assert re.fullmatch(r"v3,[0-9a-f]{64}", h["Webhook-Signature"])
        assert time.time() - int(h["Webhook-Timestamp"]) > 300
        # Even with the time window ignored, the signature itself is wrong.
        stamp = h["Webhook-Timestamp"]
        assert not verify(
            secret, h["Webhook-Id"], stamp, call.body, h["Webhook-Signature"], now=int(stamp)
        )


def test_delayed_webhook_arrives_late(api: Api, receiver: Receiver) -> None:
    """A delayed delivery is sent delay_webhook_s after the task ended."""
    api.patch(delay_webhook_rate=1.0, delay_webhook_s=0.4, inference_time_s=0.05)
    task_id = api.created(webhook=f"{receiver.url}/hook")["id"]
    [call] = receiver.received(1)
    assert call.at - api.task(task_id)["finished_at"] >= 0.35


# --- submit faults ------------------------------------------------------------------------


def test_submit_faults_and_bursts_create_no_task(api: Api) -> None:
    """Injected 5xx/429 and bursts refuse the submit without creating or charging a task."""
    body = {"prompt": "p", "image": IMAGE}
    api.patch(submit_5xx_rate=1.0)
    assert api.submit(body).status_code in {500, 502, 503}
    api.patch(submit_5xx_rate=0.0, submit_429_rate=1.0)
    failure(api.submit(body), 429)
    api.patch(submit_429_rate=0.0, burst_5xx_s=30.0)
    failure(api.submit(body), 503)
    api.patch(burst_5xx_s=0.0, burst_429_s=30.0)
    failure(api.submit(body), 429)
    api.patch(burst_429_s=0.0)
    api.created()
    assert len(api.tasks()) == 1
    faults = [r["fault"] for r in api.requests("submit")]
    assert faults == ["submit_5xx", "submit_429", "burst_5xx", "burst_429", None]


def test_ambiguous_submit_drops_the_connection_but_creates_the_task(api: Api) -> None:
    """The task is created and charged, yet the client gets a transport error, no status."""
    api.patch(ambiguous_submit_rate=1.0, inference_time_s=0.05)
    with pytest.raises(httpx.RemoteProtocolError):
        api.submit({"prompt": "p", "image": IMAGE})
    [task] = api.tasks()
    assert task["faults"]["ambiguous_submit"] is True and task["charged"] == 0.08
    assert api.balance() == pytest.approx(1000.0 - 0.08)
    [logged] = api.requests("submit")
    assert logged["status"] is None and logged["fault"] == "ambiguous_submit"
    # The client can reconcile: the task runs on and shows in the list.
    api.wait_status(task["id"], "completed")
    listed = data(api.http.post("/api/v3/predictions", json={}))["items"]
    assert [p["id"] for p in listed] == [task["id"]]


def test_seed_makes_faults_repeatable(api: Api) -> None:
    """The same seed and the same submits draw the same faults."""

    def draw() -> list[int | None]:
        api.patch(seed=7, fail_rate=0.5, fail_codes=[1200, 1402, 5000, 5003], inference_time_s=0)
        for _ in range(8):
            api.created()
        return [t["faults"]["fail_code"] for t in api.tasks()]

    first = draw()
    api.http.post("/_sim/reset")
    assert draw() == first
    assert any(code is None for code in first) and any(code is not None for code in first)


def test_config_patch_rejects_bad_knobs(api: Api) -> None:
    """Unknown knobs, wrong types and start-only knobs are 400 naming the knob."""
    for patch, knob in (
        ({"nope": 1}, "nope"),
        ({"fail_rate": 1.5}, "fail_rate"),
        ({"concurrency": True}, "concurrency"),
        ({"fail_codes": [999]}, "fail_codes"),
        ({"port": 1}, "port"),
    ):
        response = api.http.post("/_sim/config", json=patch)
        assert response.status_code == 400 and response.json()["error"].startswith(knob)


# --- the official SDK ---------------------------------------------------------------------


def test_official_sdk_run_upload_and_errors(api: Api, tmp_path: Path) -> None:
    """wavespeed.Client runs a task, uploads a file, and sees failures and lost submits."""
    api.patch(inference_time_s=0.05)
    client = wavespeed.Client(api_key="x", base_url=api.base)
    result = client.run(MODEL, {"prompt": "p", "image": IMAGE}, poll_interval=0.05, timeout=10)
    [url] = result["outputs"]
    assert api.http.get(url).headers["content-type"] == "image/jpeg"

    source = tmp_path / "source.png"
    source.write_bytes(b"\x89PNG fake bytes")
    uploaded = client.upload(str(source))
    assert uploaded.endswith("/source.png")
    fetched = api.http.get(uploaded)
    assert fetched.content == source.read_bytes()
    assert fetched.headers["content-type"] == "image/png"

    binary = api.http.post(
        "/api/v3/media/upload/binary", files={"file": ("a.jpg", b"jpeg!", "image/jpeg")}
    )
    answer = data(binary)
    assert answer["type"] == "image" and api.http.get(answer["download_url"]).content == b"jpeg!"

    api.patch(fail_rate=1.0, fail_codes=[1200])
    with pytest.raises(RuntimeError, match="moderation"):
        client.run(MODEL, {"prompt": "p", "image": IMAGE}, poll_interval=0.05, timeout=10)
    api.patch(fail_rate=0.0, ambiguous_submit_rate=1.0)
    with pytest.raises(RuntimeError, match="did not return a response"):
        client.run(MODEL, {"prompt": "p", "image": IMAGE}, poll_interval=0.05, timeout=10)


# --- CLI ----------------------------------------------------------------------------------


def test_cli_flags_map_to_the_config() -> None:
    """Every flag lands in its SimConfig field; a bad value stops the parser."""
    args = build_parser().parse_args(
        [
            "--port=0",
            "--api-key=k",
            "--fail-codes=1200,5003",
            "--concurrency=2",
            "--drop-webhook-rate=0.5",
            "--inference-time=0",
            "--burst-429-s=3",
            "--log-requests",
        ]
    )
    config = SimConfig.from_args(args)
    assert (config.port, config.api_key, config.fail_codes) == (0, "k", (1200, 5003))
    assert (config.concurrency, config.drop_webhook_rate, config.inference_time_s) == (2, 0.5, 0)
    assert config.burst_429_s == 3.0 and config.log_requests is True
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--fail-codes=42"])


def test_python_m_wavespeed_sim_serves_and_stops_on_sigint() -> None:
    """``python -m wavespeed_sim --port 0`` prints its URL, serves, and exits 0 on Ctrl-C."""
    with subprocess.Popen(
        [sys.executable, "-m", "wavespeed_sim", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            match = re.fullmatch(
                r"WaveSpeed simulator listening on (http://127\.0\.0\.1:\d+)"
                r" \(api key: any non-empty\)\n",
                line,
            )
            assert match, line
            health = httpx.get(match.group(1) + "/_sim/health", trust_env=False)
            assert health.json()["ok"] is True
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:  # never leave a stray simulator behind
                process.kill()
                process.wait()
