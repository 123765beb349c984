"""A deadline on reading a request body, so a slow client cannot hold a server thread.

gunicorn's gthread worker waits only a few seconds for a request to *start*, but once
the headers are in it reads the body from a blocking socket with no timeout: a client
that sends the headers and then trickles (or withholds) the body keeps a worker thread
for as long as it likes, and a handful of such clients take the receiver down
(slow-loris). gunicorn's `timeout` does not help: the worker's main loop stays alive.

`BodyDeadline` wraps the WSGI app. One watchdog thread per process shuts the read side
of a request's socket once `seconds` have passed since the request began and it has
not finished; the blocked read then returns at once, and the wrapped body stream turns
that into `RequestTimeout` (408). Writing the answer still works (only reading is
shut). A request that finishes in time costs one heap entry, nothing more.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from werkzeug.exceptions import RequestTimeout

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
# Where the client socket sits in the WSGI environ under gunicorn and werkzeug's server.
_SOCKET_KEYS = ("gunicorn.socket", "werkzeug.socket")


class _Watch:
    """One request under watch: its socket, and whether the deadline cut it."""

    __slots__ = ("done", "fired", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.done = False
        self.fired = False


class _Watchdog:
    """One thread per process that cuts the reads of requests past their deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Watch]] = []
        self._seq = itertools.count()
        self._pid = 0  # the thread belongs to this process (gunicorn forks after import)

    def watch(self, sock: socket.socket, seconds: float) -> _Watch:
        entry = _Watch(sock)
        with self._cond:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._heap = []
                threading.Thread(target=self._run, name="kq-body-deadline", daemon=True).start()
            heapq.heappush(self._heap, (time.monotonic() + seconds, next(self._seq), entry))
            self._cond.notify()
        return entry

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    _, _, entry = heapq.heappop(self._heap)
                    if not entry.done:
                        entry.fired = True
                        with contextlib.suppress(OSError):  # the client may be gone already
                            entry.sock.shutdown(socket.SHUT_RD)
                self._cond.wait(self._heap[0][0] - now if self._heap else None)


class _DeadlineInput:
    """`wsgi.input`, turning a read cut short by the watchdog into a 408."""

    def __init__(self, stream: Any, watch: _Watch, seconds: float) -> None:
        self._stream = stream
        self._watch = watch
        self._seconds = seconds

    def _timeout(self) -> RequestTimeout:
        return RequestTimeout(f"the request body did not arrive within {self._seconds:g} s")

    def _call(self, method: str, *args: Any) -> Any:
        try:
            data = getattr(self._stream, method)(*args)
        except Exception:
            if self._watch.fired:
                raise self._timeout() from None
            raise
        if self._watch.fired:
            raise self._timeout()
        return data

    def read(self, *args: Any) -> bytes:
        data: bytes = self._call("read", *args)
        return data

    def readline(self, *args: Any) -> bytes:
        data: bytes = self._call("readline", *args)
        return data

    def readlines(self, *args: Any) -> list[bytes]:
        data: list[bytes] = self._call("readlines", *args)
        return data

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")


class BodyDeadline:
    """WSGI middleware: a request still running `seconds` after it began can read no more."""

    def __init__(self, app: WSGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds
        self._watchdog = _Watchdog()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        sock = next((environ[k] for k in _SOCKET_KEYS if k in environ), None)
        if self.seconds <= 0 or not isinstance(sock, socket.socket):
            return self.app(environ, start_response)  # e.g. Flask's test client: no socket
        watch = self._watchdog.watch(sock, self.seconds)
        environ["wsgi.input"] = _DeadlineInput(environ["wsgi.input"], watch, self.seconds)
        try:
            return self.app(environ, start_response)
        finally:
            watch.done = True
