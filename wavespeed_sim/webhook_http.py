"""The webhook sender's HTTP client: POSTs over kept-alive HTTP/1.1 connections.

The standard library's ``http.client`` with a small pool of idle connections per origin
(scheme, host, port), so a receiver gets its webhooks over a few reused connections
instead of a handshake each. A sending thread takes a connection for one request and
puts it back once the answer is read whole. An idle connection is not reused once the
receiver has closed it (or sent anything unasked), nor after ``IDLE_EXPIRY_S`` idle,
httpx's default; there is no silent resend of a POST: a failed request is a failed
attempt, retried (or not) by the deliverer.

Why not httpx: it costs about 4x the CPU per request (its client, transport and
connection-pool layers), and the simulator sends one webhook per task; no proxy from the
environment is used either way (a local receiver must not go through HTTP(S)_PROXY), and
redirects are not followed (a 3xx answer is a failed attempt).
"""

from __future__ import annotations

import base64
import select
import ssl
import threading
import time
from collections.abc import Mapping
from http.client import HTTPConnection, HTTPSConnection
from urllib.parse import unquote, urlsplit

IDLE_EXPIRY_S = 5.0  # an idle connection older than this is closed, not reused (httpx's)

_Origin = tuple[str, str, int]


class WebhookClient:
    """Thread-safe POSTs to http(s) URLs, each answer read whole; returns the status."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[_Origin, list[tuple[float, HTTPConnection]]] = {}
        self._closed = False
        self._tls: ssl.SSLContext | None = None  # made on the first https receiver

    def post(self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float) -> int:
        """POST ``body`` to ``url``; the answer's status code. Raises OSError (timeouts
        and refused connections included), http.client.HTTPException, or ValueError for a
        URL it cannot send to."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = parts.hostname
        if scheme not in {"http", "https"} or not host:
            raise ValueError(f"not an absolute http(s) URL: {url!r}")
        origin = (scheme, host, parts.port or (443 if scheme == "https" else 80))
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if parts.username is not None:  # user:password@ in the URL: basic auth, as httpx does
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            token = base64.b64encode(pair.encode("utf-8")).decode("ascii")
            headers = {**headers, "authorization": f"Basic {token}"}
        conn = self._checkout(origin, timeout_s)
        try:
            conn.request("POST", target, body=body, headers=dict(headers))
            response = conn.getresponse()
            response.read()
        except BaseException:
            conn.close()
            raise
        self._checkin(origin, conn)
        return response.status

    def close(self) -> None:
        """Close every idle connection; connections in use close when their request ends."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for pool in idle.values():
            for _, conn in pool:
                conn.close()

    def _checkout(self, origin: _Origin, timeout_s: float) -> HTTPConnection:
        now = time.monotonic()
        while True:
            with self._lock:
                pool = self._idle.get(origin)
                if not pool:
                    break
                since, conn = pool.pop()  # the most recently used: the likeliest alive
            if now - since <= IDLE_EXPIRY_S and conn.sock is not None and _usable(conn.sock):
                conn.timeout = timeout_s
                conn.sock.settimeout(timeout_s)
                return conn
            conn.close()
        scheme, host, port = origin
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            return HTTPSConnection(host, port, timeout=timeout_s, context=self._tls)
        return HTTPConnection(host, port, timeout=timeout_s)

    def _checkin(self, origin: _Origin, conn: HTTPConnection) -> None:
        # http.client drops its socket itself when the answer said it closes the connection.
        if conn.sock is None:
            return
        with self._lock:
            if not self._closed:
                self._idle.setdefault(origin, []).append((time.monotonic(), conn))
                return
        conn.close()


def _usable(sock: object) -> bool:
    """An idle kept-alive connection can take a request: nothing to read on it (a readable
    idle socket means the peer closed it, or sent bytes nobody asked for)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)  # type: ignore[arg-type]
    return not poller.poll(0)
