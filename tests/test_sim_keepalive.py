"""Kept-alive connections both ways: the simulator's server keeps its clients' connections
open (served from a thread pool), and its webhook sender reuses its connections to a
receiver, opening a new one when the receiver has closed the old one."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.conftest import wait_for
from wavespeed_sim.config import SimConfig
from wavespeed_sim.server import SimServer
from wavespeed_sim.signing import verify

MODEL_PATH = "/api/v3/wavespeed-ai/flux-kontext-max"
EDIT = b'{"prompt": "p", "image": "https://example.com/a.jpg"}'


def test_one_connection_serves_many_requests_even_after_an_unread_body() -> None:
    """A refused POST (401 before its body is looked at), a big body and GETs all go over
    one kept-alive connection, each answered in order."""
    with SimServer(SimConfig(port=0, seed=1, inference_time_s=0.0)) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            answers = []
            conn.request("POST", MODEL_PATH, body=b'{"prompt": "x"}' * 1000)  # no key: 401
            answers.append(_status(conn))
            for _ in range(3):
                conn.request("GET", "/api/v3/balance", headers={"Authorization": "Bearer k"})
                answers.append(_status(conn))
            conn.request(
                "POST",
                MODEL_PATH,
                body=b'{"prompt": "p", "image": "https://example.com/a.jpg"}',
                headers={"Authorization": "Bearer k", "Content-Type": "application/json"},
            )
            answers.append(_status(conn))
            assert answers == [401, 200, 200, 200, 200]
            assert conn.sock is not None  # never closed by the server in between
        finally:
            conn.close()


def test_stop_does_not_wait_for_idle_kept_alive_clients() -> None:
    server = SimServer(SimConfig(port=0, seed=1)).start()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/_sim/health")
        assert _status(conn) == 200
        server.stop()  # returns although the connection above is still open and idle
    finally:
        conn.close()
        server.stop()


def _status(conn: http.client.HTTPConnection) -> int:
    response = conn.getresponse()
    response.read()
    assert response.getheader("Connection", "").lower() != "close"
    return response.status


def test_expect_100_continue_is_answered_before_the_body() -> None:
    """A client that waits for "100 Continue" before sending its body gets it at once."""
    head = (
        f"POST {MODEL_PATH} HTTP/1.1\r\nHost: sim\r\nAuthorization: Bearer k\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(EDIT)}\r\n"
        "Expect: 100-continue\r\n\r\n"
    )
    with (
        SimServer(SimConfig(port=0, seed=1, inference_time_s=0.0)) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock,
    ):
        sock.sendall(head.encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n")  # body not sent yet
        sock.sendall(EDIT)
        answer = b""
        while b'"status":"created"' not in answer:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        assert b"HTTP/1.1 200 OK\r\n" in answer


class _KeepAliveReceiver(BaseHTTPRequestHandler):
    """Answers 204 over HTTP/1.1 keep-alive; notes which connection each webhook came on.
    With ``close_after``, hangs up after answering (an idle timeout, without saying so)."""

    protocol_version = "HTTP/1.1"
    server: _Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(204)
        self.end_headers()
        self.wfile.flush()
        self.server.record(self.client_address[1], dict(self.headers), body)
        if self.server.close_after:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        """No access log."""


class _Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *, close_after: bool) -> None:
        super().__init__(("127.0.0.1", 0), _KeepAliveReceiver)
        self.close_after = close_after
        self.calls: list[tuple[int, dict[str, str], bytes]] = []
        self.hangups = 0
        self._lock = threading.Lock()

    def shutdown_request(self, request: Any) -> None:
        super().shutdown_request(request)  # the connection is closed now
        with self._lock:
            self.hangups += 1

    def record(self, port: int, headers: dict[str, str], body: bytes) -> None:
        with self._lock:
            self.calls.append((port, headers, body))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook?job=j1&t=x"


@pytest.fixture
def sim() -> Iterator[SimServer]:
    with SimServer(SimConfig(port=0, seed=1, inference_time_s=0.0)) as server:
        yield server


def _receiver(close_after: bool) -> Iterator[_Receiver]:
    receiver = _Receiver(close_after=close_after)
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.shutdown()
        thread.join()
        receiver.server_close()


@pytest.fixture
def keep_alive_receiver() -> Iterator[_Receiver]:
    yield from _receiver(close_after=False)


@pytest.fixture
def closing_receiver() -> Iterator[_Receiver]:
    yield from _receiver(close_after=True)


def _deliver(sim: SimServer, receiver: _Receiver, count: int) -> list[dict[str, Any]]:
    """Submit ``count`` tasks one after another, each once the webhook before it arrived;
    return their ground truth once every delivery has ended."""
    ids = []
    with httpx.Client(base_url=sim.url, trust_env=False, timeout=10.0) as http:
        for n in range(count):
            response = http.post(
                MODEL_PATH,
                params={"webhook": receiver.url},
                content=EDIT,
                headers={"Authorization": "Bearer k", "Content-Type": "application/json"},
            )
            ids.append(response.json()["data"]["id"])
            wait_for(lambda n=n: len(receiver.calls) > n, timeout_s=5.0)
            if receiver.close_after:  # the next webhook only once this connection is gone
                wait_for(lambda n=n: receiver.hangups > n, timeout_s=5.0)
        wait_for(lambda: http.get("/_sim/health").json()["pending_deliveries"] == 0)
        return [http.get(f"/_sim/tasks/{task_id}").json() for task_id in ids]


def test_webhooks_reuse_one_kept_alive_connection(
    sim: SimServer, keep_alive_receiver: _Receiver
) -> None:
    """Webhooks one after another go down one connection, each signed and acknowledged."""
    truth = _deliver(sim, keep_alive_receiver, 3)
    assert [(t["deliveries_attempted"], t["deliveries_acknowledged"]) for t in truth] == [
        (1, 1)
    ] * 3
    assert len({port for port, _, _ in keep_alive_receiver.calls}) == 1
    secret = sim.sim.secret()
    for _, headers, body in keep_alive_receiver.calls:
        assert verify(
            secret,
            headers["webhook-id"],
            headers["webhook-timestamp"],
            body,
            headers["webhook-signature"],
        )
        assert headers["content-type"] == "application/json"


def test_a_receiver_closing_idle_connections_costs_no_attempt(
    sim: SimServer, closing_receiver: _Receiver
) -> None:
    """A receiver that hangs up after each answer: every webhook still lands on its first
    attempt, on a new connection (the closed one is not reused)."""
    truth = _deliver(sim, closing_receiver, 3)
    assert [(t["deliveries_attempted"], t["deliveries_acknowledged"]) for t in truth] == [
        (1, 1)
    ] * 3
    assert len({port for port, _, _ in closing_receiver.calls}) == 3


@pytest.mark.parametrize(
    "length",
    [b"\xb2", b"-1", b"1e3", b"0x10", b"12\r\nContent-Length: 13"],
    ids=["superscript-two", "negative", "exponent", "hex", "two-that-disagree"],
)
def test_an_unreadable_content_length_is_refused_with_400(length: bytes) -> None:
    """Python takes "²" for a digit: such a length once ended the request with no answer
    at all. Now any length that is not plain ASCII digits gets a 400 naming the header,
    and the connection is closed (where that body ends is unknown); the server serves
    the next client as before."""
    head = (
        f"POST {MODEL_PATH} HTTP/1.1\r\nHost: sim\r\nAuthorization: Bearer k\r\n".encode()
        + b"Content-Length: " + length + b"\r\n\r\n" + EDIT
    )  # fmt: skip
    with SimServer(SimConfig(port=0, seed=1, inference_time_s=0.0)) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(head)
            answer = b""
            while chunk := sock.recv(65536):  # the server closes the connection
                answer += chunk
        status, _, rest = answer.partition(b"\r\n")
        assert status == b"HTTP/1.1 400 BAD REQUEST", answer
        headers, _, body = rest.partition(b"\r\n\r\n")
        assert b"Connection: close" in headers
        assert json.loads(body) == {
            "code": 400,
            "message": "Content-Length: expected one whole number of bytes in ASCII digits",
            "data": None,
        }
        edit = httpx.post(
            server.url + MODEL_PATH, content=EDIT, headers={"Authorization": "Bearer k"}
        )
        assert edit.status_code == 200


def test_a_lost_answer_leaves_no_traceback(capfd: pytest.CaptureFixture[str]) -> None:
    """An ambiguous submit (the sim hangs up instead of answering) is a fault the sim
    means: the answer left unsent in the handler's buffer is dropped quietly, not
    printed as a BrokenPipeError traceback when the handler closes its stream."""
    config = SimConfig(port=0, seed=1, inference_time_s=0.0, ambiguous_submit_rate=1.0)
    with SimServer(config) as server:
        for _ in range(3):
            with pytest.raises(httpx.RemoteProtocolError):
                httpx.post(
                    server.url + MODEL_PATH, content=EDIT, headers={"Authorization": "Bearer k"}
                )
        assert httpx.get(server.url + "/_sim/health").status_code == 200
    assert "Traceback" not in capfd.readouterr().err
