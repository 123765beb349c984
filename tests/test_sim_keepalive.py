"""The simulator's server keeps connections alive and serves them from a thread pool."""

from __future__ import annotations

import http.client

from wavespeed_sim.config import SimConfig
from wavespeed_sim.server import SimServer

MODEL_PATH = "/api/v3/wavespeed-ai/flux-kontext-max"


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
