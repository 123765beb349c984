"""Pass-through HTTP proxies the harness puts on the stack's two provider paths.

- `ProviderProxy` sits between the stack and the simulator's API. Every provider call of
  the worker, beat and receiver goes through it unchanged: same method, path, query,
  headers and body, and the simulator's answer back. When the simulator drops a
  connection (its ambiguous-submit fault), the proxy drops the client's connection too,
  so an ambiguous submit stays ambiguous and is not turned into a 502. It records what
  became of every submit's answer (`SubmitRecord`), and can hold answers:
  `arm_hold()` makes the next successful submit (or the next `count`, or all of them)
  wait *after* the simulator created the task and *before* the worker hears the answer;
  the harness then kills the worker (the kill lands between the POST and the recording
  of the prediction id) or stops Redis and lets the answers go (`release(answer=True)`:
  they reach a worker that cannot record them).
- `WebhookProxy` sits between the simulator's webhook sender and the receiver
  (`KQ_WEBHOOK_PUBLIC_URL` points at it). It records every delivery attempt and the
  receiver's answer to it (`WebhookRecord`: status and the `result` word, e.g.
  "applied" or "duplicate"), which the simulator itself does not keep, and can hold
  deliveries for a moment and let them go at once (`gate()` / `open_gate()`): a burst.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass
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
# How long held webhook deliveries wait at most before they go on anyway.
GATE_LIMIT_S = 10.0


class _QuietServer(ThreadingHTTPServer):
    """Clients that die mid-request (killed workers) are expected here, not news."""

    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


def _job_of(url: str) -> str:
    """The job id in a webhook URL (`...?job=<id>&t=<token>`), or ""."""
    return parse_qs(urlsplit(url).query).get("job", [""])[0]


class _Proxy:
    """A threaded HTTP proxy to `upstream` (settable later: it may start after us)."""

    def __init__(self, name: str, host: str, timeout_s: float) -> None:
        self.upstream: str | None = None
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=5.0),
            trust_env=False,
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )
        self._lock = threading.Lock()
        self.forwarded = 0
        self.dropped = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy._handle(self)

            def do_POST(self) -> None:
                proxy._handle(self)

        self._server = _QuietServer((host, 0), Handler)
        self.url = f"http://{host}:{self._server.server_port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name=name, daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._unblock()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        self._client.close()

    def _unblock(self) -> None:
        """Let every waiting request go (stopping)."""

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        raise NotImplementedError

    def _read(self, handler: BaseHTTPRequestHandler) -> tuple[bytes, dict[str, str]]:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_HEADERS}
        return body, headers

    def _send(
        self, handler: BaseHTTPRequestHandler, body: bytes, headers: dict[str, str]
    ) -> httpx.Response | None:
        """Forward the request upstream; None when upstream gave no answer (the client's
        connection is then dropped too, without an answer)."""
        if self.upstream is None:
            self._answer(handler, 503, b'{"code":503,"message":"proxy not ready","data":null}', {})
            return None
        try:
            response = self._client.request(
                handler.command, self.upstream + handler.path, content=body, headers=headers
            )
        except httpx.HTTPError:
            with self._lock:
                self.dropped += 1
            handler.close_connection = True
            return None
        with self._lock:
            self.forwarded += 1
        return response

    def _relay(self, handler: BaseHTTPRequestHandler, response: httpx.Response) -> bool:
        kept = {
            k: v for k, v in response.headers.items() if k.lower() not in (*_HOP_HEADERS, "date")
        }
        return self._answer(handler, response.status_code, response.content, kept)

    @staticmethod
    def _answer(
        handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str]
    ) -> bool:
        """Write an answer; False if the client was gone (killed meanwhile)."""
        try:
            handler.send_response(status)
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            handler.wfile.flush()
        except OSError:
            handler.close_connection = True
            return False
        return True


@dataclass(frozen=True)
class SubmitRecord:
    """What became of one submit that reached the simulator.

    `fate`: "answered" (written to the worker's connection), "client_gone" (the worker
    was gone when the answer was written), "held" (never answered: held, then dropped),
    "dropped_upstream" (the simulator hung up: its ambiguous-submit fault; no task id).
    """

    job_id: str
    task_id: str
    status: int | None
    fate: str
    sent_at: float  # time.time() when the POST reached the proxy
    answered_at: float  # when its fate was sealed


class ProviderProxy(_Proxy):
    """The proxy in front of the simulator's API; holds submit answers on demand."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__("chaos-proxy", host, timeout_s=30.0)
        self._armed = 0  # answers still to hold; -1: every one until released
        self.held = threading.Event()
        self._release = threading.Event()
        self._deliver_held = False
        self.held_job: str | None = None  # the first job whose answer was held
        self.held_count = 0
        self.submits: list[SubmitRecord] = []

    def arm_hold(self, count: int | None = 1) -> None:
        """Hold the answers of the next `count` submits that create a task (None: all)."""
        with self._lock:
            self.held.clear()
            self._release.clear()
            self._deliver_held = False
            self.held_job = None
            self.held_count = 0
            self._armed = -1 if count is None else count

    def wait_held(self, count: int, timeout_s: float) -> int:
        """Wait until `count` answers are held (or the timeout); how many are."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if self.held_count >= count:
                    break
            time.sleep(0.02)
        with self._lock:
            return self.held_count

    def release(self, *, answer: bool = False) -> None:
        """Disarm and let the held connections go: dropped without an answer, or (with
        `answer`) answered as the simulator answered."""
        with self._lock:
            self._armed = 0
            self._deliver_held = answer
        self._release.set()

    def _unblock(self) -> None:
        self._release.set()

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        body, headers = self._read(handler)
        sent_at = time.time()
        response = self._send(handler, body, headers)
        submit = handler.command == "POST" and urlsplit(handler.path).path == SUBMIT_PATH
        job_id = _job_of(parse_qs(urlsplit(handler.path).query).get("webhook", [""])[0])
        if response is None:
            if submit:
                self._note(SubmitRecord(job_id, "", None, "dropped_upstream", sent_at, time.time()))
            return
        task_id = _task_id(response) if submit else ""
        if submit and self._should_hold(job_id, response):
            self.held.set()
            self._release.wait(HOLD_LIMIT_S)
            with self._lock:
                deliver = self._deliver_held
            if not deliver:
                handler.close_connection = True  # the client is gone (killed); never answer
                self._note(SubmitRecord(job_id, task_id, 200, "held", sent_at, time.time()))
                return
        delivered = self._relay(handler, response)
        if submit:
            fate = "answered" if delivered else "client_gone"
            status = response.status_code
            self._note(SubmitRecord(job_id, task_id, status, fate, sent_at, time.time()))

    def _note(self, record: SubmitRecord) -> None:
        with self._lock:
            self.submits.append(record)

    def _should_hold(self, job_id: str, response: httpx.Response) -> bool:
        if response.status_code != 200:
            return False
        with self._lock:
            if not self._armed:
                return False
            if self._armed > 0:
                self._armed -= 1
            self.held_count += 1
            if self.held_job is None:
                self.held_job = job_id or None
        return True


def _task_id(response: httpx.Response) -> str:
    try:
        data = response.json().get("data") or {}
        return str(data.get("id") or "")
    except (ValueError, AttributeError):
        return ""


@dataclass(frozen=True)
class WebhookRecord:
    """One delivery attempt of a webhook and the receiver's answer to it.

    `status` None: the receiver gave no answer (connection reset, killed worker, refused).
    `result`: the `result` word of the receiver's JSON answer ("" if none).
    """

    webhook_id: str
    job_id: str
    task_id: str
    body_status: str  # the prediction status the webhook carried
    status: int | None
    result: str
    arrived_at: float  # time.time() when the attempt reached the proxy
    answered_at: float  # when the receiver's answer (or failure) came back
    gated: bool  # held at the gate before being forwarded


class WebhookProxy(_Proxy):
    """The proxy in front of the receiver; records every answer, can make a burst."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        # Longer than the simulator's own timeout: the receiver's answer is recorded even
        # when the sender has stopped waiting for it.
        super().__init__("chaos-webhook-proxy", host, timeout_s=30.0)
        self.records: list[WebhookRecord] = []
        self._open = threading.Event()
        self._open.set()
        self._waiting = 0

    def gate(self) -> None:
        """Hold every delivery that arrives from now on, until `open_gate()`."""
        self._open.clear()

    def waiting(self) -> int:
        with self._lock:
            return self._waiting

    def open_gate(self) -> int:
        """Let the held deliveries go, all at once; how many there were."""
        with self._lock:
            held = self._waiting
        self._open.set()
        return held

    def _unblock(self) -> None:
        self._open.set()

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        body, headers = self._read(handler)
        arrived = time.time()
        gated = not self._open.is_set()
        if gated:
            with self._lock:
                self._waiting += 1
            self._open.wait(GATE_LIMIT_S)
            with self._lock:
                self._waiting -= 1
        response = self._send(handler, body, headers)
        answered = time.time()
        result = ""
        if response is not None:
            with contextlib.suppress(ValueError, AttributeError):
                result = str(response.json().get("result") or "")
            self._relay(handler, response)
        task_id, body_status = "", ""
        with contextlib.suppress(ValueError, AttributeError):
            payload = json.loads(body)
            task_id, body_status = str(payload.get("id") or ""), str(payload.get("status") or "")
        record = WebhookRecord(
            webhook_id=handler.headers.get("webhook-id") or "",
            job_id=_job_of(handler.path),
            task_id=task_id,
            body_status=body_status,
            status=None if response is None else response.status_code,
            result=result,
            arrived_at=arrived,
            answered_at=answered,
            gated=gated,
        )
        with self._lock:
            self.records.append(record)
