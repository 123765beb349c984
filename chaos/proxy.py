"""A pass-through HTTP proxy between the stack and the simulator that can hold one answer.

Every provider call of the worker, beat and receiver goes through it unchanged: same
method, path, query, headers and body, and the simulator's answer back. When the
simulator drops a connection (its ambiguous-submit fault), the proxy drops the client's
connection too, so an ambiguous submit stays ambiguous and is not turned into a 502.

`arm_hold()` makes the next successful submit (or the next `count`, or all of them)
wait *after* the simulator created the task and *before* the worker hears the answer:
the harness then kills the worker, so the kill lands exactly between the POST and the
recording of the prediction id.
"""

from __future__ import annotations

import contextlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from worker.wavespeed import SUBMIT_PATH

# Headers that describe one hop, not the message: never forwarded.
_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "te", "upgrade"}
)
# How long a held answer waits for the harness before the connection is dropped anyway.
HOLD_LIMIT_S = 60.0


class _QuietServer(ThreadingHTTPServer):
    """Clients that die mid-request (killed workers) are expected here, not news."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class ProviderProxy:
    """A threaded HTTP proxy to `upstream` (settable later: the simulator starts after it)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.upstream: str | None = None
        self._client = httpx.Client(
            timeout=httpx.Timeout(30.0, connect=5.0),
            trust_env=False,
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )
        self._lock = threading.Lock()
        self._armed = 0  # answers still to hold; -1: every one until released
        self.held = threading.Event()
        self._release = threading.Event()
        self.held_job: str | None = None  # the first job whose answer was held
        self.held_count = 0
        self.forwarded = 0
        self.dropped = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy._forward(self)

            def do_POST(self) -> None:
                proxy._forward(self)

        self._server = _QuietServer((host, 0), Handler)
        self.url = f"http://{host}:{self._server.server_port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name="chaos-proxy", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        self._client.close()

    def arm_hold(self, count: int | None = 1) -> None:
        """Hold the answers of the next `count` submits that create a task (None: all)."""
        with self._lock:
            self.held.clear()
            self._release.clear()
            self.held_job = None
            self.held_count = 0
            self._armed = -1 if count is None else count

    def release(self) -> None:
        """Let the held connections go (each is dropped without an answer); disarm."""
        with self._lock:
            self._armed = 0
        self._release.set()

    # --- internals ------------------------------------------------------------------------

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        if self.upstream is None:
            self._answer(handler, 503, b'{"code":503,"message":"proxy not ready","data":null}', {})
            return
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_HEADERS}
        try:
            response = self._client.request(
                handler.command, self.upstream + handler.path, content=body, headers=headers
            )
        except httpx.HTTPError:
            # The simulator hung up without an answer: do the same to our client.
            self.dropped += 1
            handler.close_connection = True
            return
        self.forwarded += 1
        if self._should_hold(handler, response):
            self.held.set()
            self._release.wait(HOLD_LIMIT_S)
            handler.close_connection = True  # the client is gone (killed); never answer
            return
        kept = {
            k: v for k, v in response.headers.items() if k.lower() not in (*_HOP_HEADERS, "date")
        }
        self._answer(handler, response.status_code, response.content, kept)

    def _should_hold(self, handler: BaseHTTPRequestHandler, response: httpx.Response) -> bool:
        parts = urlsplit(handler.path)
        if handler.command != "POST" or parts.path != SUBMIT_PATH or response.status_code != 200:
            return False
        hook = parse_qs(parts.query).get("webhook", [""])[0]
        with self._lock:
            if not self._armed:
                return False
            if self._armed > 0:
                self._armed -= 1
            self.held_count += 1
            if self.held_job is None:
                self.held_job = parse_qs(urlsplit(hook).query).get("job", [""])[0] or None
        return True

    @staticmethod
    def _answer(
        handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str]
    ) -> None:
        with contextlib.suppress(OSError):  # the client may have been killed meanwhile
            handler.send_response(status)
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
