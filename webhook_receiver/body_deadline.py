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
shut). A request that finishes in time costs one heap entry (dropped at its
deadline), nothing more: the watchdog wakes at deadlines, not per request.

A request answered before its body was read to its end (413 without reading, a
chunked body cut at the limit, a 408) also closes its connection. Otherwise gunicorn
announces `Connection: keep-alive`, then drains at most 64 KiB of what is left and
hangs up: the sender's next request on that connection fails with no answer at all
(and a provider loses one of its few delivery attempts). A WSGI app may not send
hop-by-hop headers itself, so the middleware asks gunicorn's response to close (its
`Connection: close`); werkzeug's server closes every connection anyway.
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
# The watchdog's shortest sleep (see _Watchdog._run).
TICK_S = 0.05


class _Watch:
    """One request under watch: its socket, and whether the deadline cut it."""

    __slots__ = ("done", "fired", "seconds", "sock")

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self.sock = sock
        self.seconds = seconds
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
        entry = _Watch(sock, seconds)
        with self._cond:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._heap = []
                threading.Thread(target=self._run, name="kq-body-deadline", daemon=True).start()
            item = (time.monotonic() + seconds, next(self._seq), entry)
            heapq.heappush(self._heap, item)
            # Wake the watchdog only when its next deadline moved earlier: with one
            # `seconds` for every request that is only the first entry of an empty heap,
            # so a request costs no thread switch.
            if self._heap[0] is item:
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
                # At least TICK_S between wakes: under steady load the next deadline is
                # always a request or two away, and waking for each would cost a thread
                # switch per request. A cut comes at most TICK_S late.
                self._cond.wait(max(self._heap[0][0] - now, TICK_S) if self._heap else None)


class _BodyInput:
    """`wsgi.input`, turning a read cut short by the watchdog into a 408, and knowing
    whether the body was read to its end."""

    def __init__(self, stream: Any, environ: dict[str, Any], watch: _Watch | None) -> None:
        self._stream = stream
        self._watch = watch
        self._length = _content_length(environ)
        self._chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        self._read = 0
        self._eof = False

    @property
    def finished(self) -> bool:
        """True when nothing of the body is left on the connection."""
        if self._eof:
            return True
        if self._length is not None:
            return self._read >= self._length
        return not self._chunked  # neither a length nor chunked: there is no body

    def _timeout(self) -> RequestTimeout:
        assert self._watch is not None
        return RequestTimeout(f"the request body did not arrive within {self._watch.seconds:g} s")

    def _call(self, method: str, *args: Any) -> Any:
        try:
            data = getattr(self._stream, method)(*args)
        except Exception:
            if self._watch is not None and self._watch.fired:
                raise self._timeout() from None
            raise
        if self._watch is not None and self._watch.fired:
            raise self._timeout()
        return data

    def read(self, *args: Any) -> bytes:
        data: bytes = self._call("read", *args)
        self._read += len(data)
        size = args[0] if args else None
        if size is None or size < 0 or (size > 0 and not data):
            self._eof = True  # read() reads to the end; an empty read is the end
        return data

    def readline(self, *args: Any) -> bytes:
        data: bytes = self._call("readline", *args)
        self._read += len(data)
        if not data and (not args or args[0] != 0):
            self._eof = True
        return data

    def readlines(self, *args: Any) -> list[bytes]:
        data: list[bytes] = self._call("readlines", *args)
        self._read += sum(len(line) for line in data)
        hint = args[0] if args else None
        if hint is None or hint <= 0 or not data:
            self._eof = True  # without a hint, readlines() reads to the end
        return data

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")


def _content_length(environ: dict[str, Any]) -> int | None:
    try:
        length = int(environ.get("CONTENT_LENGTH") or "")
    except ValueError:
        return None
    return length if length >= 0 else None


def _close_connection(start_response: Callable[..., Any]) -> None:
    """Make the server close the connection after this answer.

    gunicorn's `start_response` is a method of its response object, whose
    `force_close()` is what gunicorn itself calls to answer `Connection: close`.
    """
    force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
    if callable(force_close):
        force_close()


class BodyDeadline:
    """WSGI middleware: a request still running `seconds` after it began can read no more;
    one answered before its body was read to its end closes its connection."""

    def __init__(self, app: WSGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds
        self._watchdog = _Watchdog()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        sock = next((environ[k] for k in _SOCKET_KEYS if k in environ), None)
        watch = None
        if self.seconds > 0 and isinstance(sock, socket.socket):  # e.g. Flask's test client
            watch = self._watchdog.watch(sock, self.seconds)
        body = _BodyInput(environ["wsgi.input"], environ, watch)
        environ["wsgi.input"] = body

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if not body.finished:
                _close_connection(start_response)
            return start_response(status, headers, exc_info)

        try:
            return self.app(environ, start)
        finally:
            if watch is not None:
                watch.done = True
