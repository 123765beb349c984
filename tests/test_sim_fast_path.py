"""The simulator's plain-WSGI submit path (``FastSubmit``) answers exactly as Flask's view.

Each case sends the same raw request to a real SimServer twice, the fast path on and
then off (Flask serving it), and compares the raw answers (status line, headers but
Date, body bytes) and the request-log entries, ids and times aside.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import wait_for
from wavespeed_sim.app import FastSubmit
from wavespeed_sim.config import SimConfig
from wavespeed_sim.server import SimServer

MODEL_PATH = "/api/v3/wavespeed-ai/flux-kontext-max"
MULTI_PATH = "/api/v3/wavespeed-ai/flux-kontext-pro/multi"
EDIT = {"prompt": "p", "image": "https://example.com/a.jpg", "seed": 7, "extra": 1}
HOOK = "webhook=http%3A%2F%2F127.0.0.1%3A9%2Fhook%3Fjob%3Dj1%26t%3Dx&other=a&other=b"
KEY = "test-key"


@pytest.fixture
def server() -> Iterator[SimServer]:
    # Tasks never end during a test (no webhook is sent); a configured key, so a wrong
    # one is refused.
    with SimServer(SimConfig(port=0, seed=3, inference_time_s=60.0, api_key=KEY)) as sim:
        yield sim


def _fast(server: SimServer) -> FastSubmit:
    fast = server.app.extensions["wavespeed_sim.fast_submit"]
    assert isinstance(fast, FastSubmit)
    return fast


def _request(
    body: bytes | None,
    *,
    path: str = MODEL_PATH,
    query: str = HOOK,
    auth: str | None = f"Bearer {KEY}",
    extra: str = "",
) -> bytes:
    head = f"POST {path}{'?' + query if query else ''} HTTP/1.1\r\nHost: sim.test:8765\r\n"
    if auth is not None:
        head += f"Authorization: {auth}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + extra + "\r\n").encode() + (body or b"")


def _exchange(port: int, request: bytes) -> bytes:
    """Send one request on a new connection; the raw answer (b"" if none came)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                return answer
            answer += data
        head, _, body = answer.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        assert length is not None, head
        while len(body) < int(length.group(1)):
            data = sock.recv(65536)
            assert data, "connection closed mid-body"
            body += data
        return head + b"\r\n\r\n" + body


def _normalized(answer: bytes) -> bytes:
    """The answer without its Date header, prediction ids and creation times."""
    answer = re.sub(rb"(?im)^date: [^\r\n]*\r\n", b"", answer)
    answer = re.sub(rb"[0-9a-f]{32}", b"<id>", answer)
    return re.sub(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", b"<time>", answer)


def _entry(server: SimServer, since: int) -> dict[str, Any]:
    # A dropped answer is logged just after the socket is shut: wait for the entry.
    [entry] = wait_for(lambda: server.sim.requests.entries()[since:])
    del entry["seq"], entry["time"]
    if entry["task_id"] is not None:
        entry["task_id"] = "<id>"
    return entry


def _both_ways(server: SimServer, request: bytes) -> tuple[bytes, dict[str, Any]]:
    """The normalized answer and log entry, checked equal with the fast path on and off;
    also checks which of the two served each (``served_by_fast``)."""
    fast = _fast(server)
    flask_calls: list[str] = []
    inner: Callable[..., Any] = fast._app

    def flask_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        flask_calls.append(environ["PATH_INFO"])
        return inner(environ, start_response)

    fast._app = flask_app
    results = []
    try:
        for enabled in (True, False):
            fast.enabled = enabled
            since = len(server.sim.requests.entries())
            answer = _normalized(_exchange(server.port, request))
            results.append((answer, _entry(server, since), len(flask_calls)))
    finally:
        fast._app, fast.enabled = inner, True
    (fast_answer, fast_entry, calls_on), (flask_answer, flask_entry, calls_total) = results
    assert fast_answer == flask_answer
    assert fast_entry == flask_entry
    assert calls_total == calls_on + 1  # Flask served the second one
    _both_ways.served_by_fast = calls_on == 0  # type: ignore[attr-defined]
    return fast_answer, fast_entry


def _status(answer: bytes) -> bytes:
    return answer.split(b"\r\n", 1)[0]


def _envelope(answer: bytes) -> Any:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


def test_valid_submit_same_bytes_and_log_entry(server: SimServer) -> None:
    answer, entry = _both_ways(server, _request(json.dumps(EDIT).encode()))
    assert _both_ways.served_by_fast  # type: ignore[attr-defined]
    assert _status(answer) == b"HTTP/1.1 200 OK"
    assert b"\r\nContent-Type: application/json\r\n" in answer
    envelope = _envelope(answer)
    assert envelope["code"] == 200 and envelope["data"]["status"] == "created"
    assert envelope["data"]["urls"]["get"] == "http://sim.test:8765/api/v3/predictions/<id>/result"
    assert entry == {
        "method": "POST",
        "path": MODEL_PATH,
        "query_string": HOOK,
        "query": {"webhook": "http://127.0.0.1:9/hook?job=j1&t=x", "other": "a"},
        "kind": "submit",
        "status": 200,
        "task_id": "<id>",
        "model": "wavespeed-ai/flux-kontext-max",
        "fault": None,
        "body": EDIT,
    }
    tasks = server.sim.tasks_snapshot()
    assert len(tasks) == 2 and tasks[0]["params"] == tasks[1]["params"]
    assert tasks[0]["webhook"] == tasks[1]["webhook"] == "http://127.0.0.1:9/hook?job=j1&t=x"


def test_valid_submit_on_a_closing_connection_same_bytes(server: SimServer) -> None:
    """`Connection: close`: werkzeug's runner serves it, FastSubmit as WSGI middleware."""
    request = _request(json.dumps(EDIT).encode(), extra="Connection: close\r\n")
    answer, entry = _both_ways(server, request)
    assert _both_ways.served_by_fast  # type: ignore[attr-defined]
    assert _status(answer) == b"HTTP/1.1 200 OK" and b"\r\nConnection: close\r\n" in answer
    assert entry["status"] == 200 and entry["body"] == EDIT


def test_every_model_route_and_sync_mode(server: SimServer) -> None:
    multi = {"prompt": "p", "images": ["https://example.com/a.jpg"], "seed": 1}
    answer, entry = _both_ways(server, _request(json.dumps(multi).encode(), path=MULTI_PATH))
    assert _both_ways.served_by_fast  # type: ignore[attr-defined]
    assert _status(answer) == b"HTTP/1.1 200 OK"
    assert entry["model"] == "wavespeed-ai/flux-kontext-pro/multi"
    # Sync mode waits for the end (here: its timeout, code 5004) on either path.
    server.sim.patch_config({"sync_timeout_s": 0.05})
    sync = json.dumps({**EDIT, "enable_sync_mode": True}).encode()
    answer, _ = _both_ways(server, _request(sync, query=""))
    assert _envelope(answer)["data"]["code"] == 5004


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"image": "https://example.com/a.jpg"}', "prompt"),
        (b'{"prompt": "p", "image": "ftp://x"}', "image"),
        (b'{"prompt": "p", "image": "https://example.com/a.jpg", "seed": true}', "seed"),
        (b"{not json", "body"),
        (b"null", "body"),
        (b"[1]", "body"),
        (b"  ", "prompt"),
        (b"", "prompt"),
    ],
)
def test_bad_parameters_same_400(server: SimServer, body: bytes, field: str) -> None:
    answer, entry = _both_ways(server, _request(body))
    assert _both_ways.served_by_fast  # type: ignore[attr-defined]
    assert _status(answer) == b"HTTP/1.1 400 BAD REQUEST"
    assert _envelope(answer)["message"].startswith(field + ":")
    assert entry["status"] == 400 and entry["task_id"] is None
    assert server.sim.tasks_snapshot() == []


def test_bad_webhook_same_400(server: SimServer) -> None:
    answer, entry = _both_ways(server, _request(json.dumps(EDIT).encode(), query="webhook=nope"))
    assert _envelope(answer)["message"].startswith("webhook:")
    assert entry["body"] == EDIT and entry["query"] == {"webhook": "nope"}


@pytest.mark.parametrize("auth", [None, "Bearer ", "Basic abc", "Bearer wrong-key"])
def test_missing_or_invalid_key_same_401(server: SimServer, auth: str | None) -> None:
    answer, entry = _both_ways(server, _request(json.dumps(EDIT).encode(), auth=auth))
    assert _status(answer) == b"HTTP/1.1 401 UNAUTHORIZED"
    assert entry["status"] == 401 and entry["model"] is None and entry["body"] is None


@pytest.mark.parametrize(
    ("patch", "status", "fault", "retry_after"),
    [
        ({"burst_429_s": 30.0}, b"429 TOO MANY REQUESTS", "burst_429", True),
        ({"burst_5xx_s": 30.0}, b"503 SERVICE UNAVAILABLE", "burst_5xx", False),
        ({"balance": 0.0}, b"402 PAYMENT REQUIRED", "insufficient_balance", False),
    ],
)
def test_refused_submit_same_answer(
    server: SimServer, patch: dict[str, float], status: bytes, fault: str, retry_after: bool
) -> None:
    server.sim.patch_config(patch)
    answer, entry = _both_ways(server, _request(json.dumps(EDIT).encode()))
    assert _both_ways.served_by_fast  # type: ignore[attr-defined]
    assert _status(answer) == b"HTTP/1.1 " + status
    assert (b"\r\nRetry-After: " in answer) is retry_after
    assert entry["fault"] == fault and entry["task_id"] is None


def test_ambiguous_submit_drops_the_connection_either_way(server: SimServer) -> None:
    server.sim.patch_config({"ambiguous_submit_rate": 1.0})
    answer, entry = _both_ways(server, _request(json.dumps(EDIT).encode()))
    assert answer == b""  # no status line at all
    assert entry["status"] is None and entry["fault"] == "ambiguous_submit"
    assert entry["task_id"] == "<id>"
    assert len(server.sim.tasks_snapshot()) == 2


def test_unusual_requests_go_to_flask_with_the_body_intact(server: SimServer) -> None:
    """A chunked body (no Content-Length) is Flask's: answered as a plain one would be."""
    body = json.dumps(EDIT).encode()
    chunked = _request(None, extra="Transfer-Encoding: chunked\r\n") + (
        f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    )
    answer = _normalized(_exchange(server.port, chunked))
    assert _status(answer) == b"HTTP/1.1 200 OK"
    assert _envelope(answer)["data"]["status"] == "created"
    entry = _entry(server, len(server.sim.requests.entries()) - 1)
    assert entry["body"] == EDIT and entry["status"] == 200


def test_kept_alive_connection_serves_fast_and_flask_requests_in_turn(server: SimServer) -> None:
    body = json.dumps(EDIT).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        for request in (
            _request(body),
            _request(b"{bad"),
            _request(body, auth=None),
            b"GET /api/v3/balance HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-key\r\n\r\n",
            _request(body),
        ):
            sock.sendall(request)
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.endswith(b"}\n"):
                data = sock.recv(65536)
                assert data
                answer += data
            assert answer.startswith(b"HTTP/1.1 ")
    statuses = [e["status"] for e in server.sim.requests.entries()]
    assert statuses == [200, 400, 401, 200, 200]
