"""Run a WSGI app factory under gunicorn in the foreground (gthread or gevent workers).

gevent workers serve each connection in a greenlet: waiting on a socket (the client's,
Redis's) costs a switch inside the process instead of an OS thread's wake-up and a turn
at the GIL. The process must have been patched by gevent before anything imported
`socket` or `ssl` (`kq.gevent_main`).

With `json_errors`, the errors gunicorn answers itself, before the app sees the request
(a request line over `limit_request_line` bytes: 414; too many or too large header
fields: 431; a request that is not HTTP: 400), get a JSON body in the API's shape,
`{"error": {"code", "message"}}`, instead of gunicorn's HTML page.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

from gunicorn import util as gunicorn_util
from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker

# gunicorn's own limits (its defaults, stated here so the API can document them).
LIMIT_REQUEST_LINE = 4094
LIMIT_REQUEST_FIELDS = 100
LIMIT_REQUEST_FIELD_SIZE = 8190

WORKER_CLASSES = ("gthread", "gevent")


def json_error_response(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 error response with a JSON body; the connection is closed after."""
    code = reason.lower().replace(" ", "_").replace("-", "_")
    body = json.dumps({"error": {"code": code, "message": message or reason}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    gunicorn_util.write_nonblock(sock, json_error_response(status_int, reason, mesg))


class JsonErrorThreadWorker(ThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker, answering its own errors in JSON."""

    def init_process(self) -> None:
        # gunicorn writes every error it answers itself through `util.write_error`;
        # this worker process serves only our app, so replace it here, once.
        gunicorn_util.write_error = _write_json_error
        super().init_process()


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, factory: Callable[[], Any], options: dict[str, Any]) -> None:
        self._factory = factory
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self._factory()


def serve(
    factory: Callable[[], Any],
    *,
    host: str,
    port: int,
    workers: int = 2,
    threads: int = 8,
    timeout_s: int = 60,
    json_errors: bool = False,
    worker_class: str = "gthread",
    connections: int = 1000,
) -> None:
    """Serve `factory()` until SIGTERM / Ctrl-C; each worker process builds its own app.

    `threads` are a gthread worker's; `connections` the most a worker holds open at once
    (a gevent worker serves each in a greenlet)."""
    if worker_class not in WORKER_CLASSES:
        raise ValueError(f"worker_class: expected one of {WORKER_CLASSES}, got {worker_class!r}")
    if json_errors and worker_class != "gthread":
        raise ValueError("json_errors: only with gthread workers")
    _Gunicorn(
        factory,
        {
            "bind": f"{host}:{port}",
            "workers": workers,
            "threads": threads,
            "worker_class": JsonErrorThreadWorker if json_errors else worker_class,
            "worker_connections": connections,
            "timeout": timeout_s,
            "graceful_timeout": 10,
            # No access log: URLs carry tokens (webhook `t=`, dashboard `/login?token=`).
            "keepalive": 5,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": "warning",
            "limit_request_line": LIMIT_REQUEST_LINE,
            "limit_request_fields": LIMIT_REQUEST_FIELDS,
            "limit_request_field_size": LIMIT_REQUEST_FIELD_SIZE,
        },
    ).run()
