"""``SimServer``: the simulator on a real socket, in a background thread or in the foreground.

werkzeug's request handler on a server of our own: connections are served by a pool of
reused threads and kept alive between requests (HTTP/1.1), so a client with a pooled
connection (httpx, the SDK's session) pays neither a TCP handshake nor a new thread per
call. werkzeug's own threaded server does both (a thread per connection, and it closes
every connection after one response because it cannot tell how much of a request body the
app left unread); here a body is read whole before the app sees it, so the next request
line is always where the handler looks. A connection idle for KEEP_ALIVE_IDLE_S is closed,
and stopping shuts down every open connection, so it never waits on idle clients.

Submits (the hot path) skip werkzeug's WSGI runner: once the body is read whole, the
handler asks the app's ``FastSubmit`` (app.py) for the answer and writes it itself,
status line and headers through http.server as werkzeug does, so the bytes are the same.
werkzeug's runner would then drain a socket known to be empty, with a new epoll
selector per request: four system calls (create, register, wait, close), each releasing
the GIL, which under load (many connections, one GIL) cost more CPU than the rest of
the request's writing.

    with SimServer(SimConfig(port=0, inference_time_s=0.1)) as server:
        httpx.get(server.url + "/_sim/health")
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import socketserver
import threading
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler

from wavespeed_sim.app import FastSubmit, create_app, error_envelope
from wavespeed_sim.config import SimConfig
from wavespeed_sim.engine import Simulator

POLL_INTERVAL_S = 0.1  # how quickly serve_forever notices shutdown()
# A kept-alive connection holds a pool thread; one idle this long is closed. Longer than
# any client keeps an idle connection (httpx: 5 s), so a client never sends its next
# request down a connection the server is closing at that moment (a lost request).
KEEP_ALIVE_IDLE_S = 65.0
# Most connections served at once (each holds a thread while open; threads are reused).
# Generous: a client may open one per thread of its own (the SDK baseline: 200).
POOL_THREADS = 512
# Bodies up to this size are read whole before the app runs (kept-alive connection);
# a larger or chunked one is streamed and its connection closed after the response.
MAX_BUFFERED_BODY = 64 * 1024 * 1024


def _plain_length(values: list[str] | None) -> bool:
    """No Content-Length, or one (repeats allowed if equal) of ASCII digits only."""
    return not values or (
        len(set(values)) == 1 and values[0].isascii() and values[0].strip().isdigit()
    )


class _KeepAliveHandler(WSGIRequestHandler):
    """werkzeug's handler, keeping the connection open after a response when it can."""

    protocol_version = "HTTP/1.1"
    timeout = KEEP_ALIVE_IDLE_S  # socket timeout: an idle kept-alive connection ends
    # Answers are written through a buffer, sent whole at werkzeug's flush after the body:
    # the status line, headers and body leave in one send, not two.
    wbufsize = -1
    # Should an answer still go out in several writes (a body bigger than the buffer),
    # without TCP_NODELAY a kept-alive connection would wait for the client's delayed ACK.
    disable_nagle_algorithm = True
    _reusable = False
    _pending: Any = None  # an environ made before werkzeug's runner was called (see _run_fast)

    def handle_expect_100(self) -> bool:
        proceed = bool(super().handle_expect_100())
        self.wfile.flush()  # the client waits for this "100 Continue" before its body
        return proceed

    def make_environ(self) -> Any:
        pending, self._pending = self._pending, None
        if pending is not None:
            return pending  # made (body read) by _run_fast, which left the request to werkzeug
        environ = super().make_environ()
        environ["werkzeug.socket"] = self.request  # the client's socket (see run_wsgi)
        length = environ.get("CONTENT_LENGTH") or "0"
        self._reusable = not self.close_connection and "wsgi.input_terminated" not in environ
        if self._reusable and int(length) <= MAX_BUFFERED_BODY:  # plain: see run_wsgi
            # The whole body now: whatever the app reads, the next request starts here.
            environ["wsgi.input"] = io.BytesIO(self.rfile.read(int(length)))
            # Nothing of this request is left to read, so werkzeug's drain (see run_wsgi)
            # is shown a socket at end-of-file and an empty stream: it ends at once, where
            # on a socket with nothing to read it would wait 10 ms, holding the connection.
            self.connection = self.server.at_eof  # type: ignore[attr-defined]
            self.rfile = io.BytesIO()
        else:
            self._reusable = False
        return environ

    def run_wsgi(self) -> None:
        if not _plain_length(self.headers.get_all("Content-Length")):
            self._refuse_length()
            return
        # After each response werkzeug reads and throws away whatever the client has sent
        # meanwhile (on a kept-alive connection: the next request) from `self.rfile`, for as
        # long as `self.connection` is readable. Here `self.connection` is a socket on which
        # nothing ever arrives (make_environ swaps both when the body has been read whole).
        self.connection = self.server.never_readable  # type: ignore[attr-defined]
        rfile = self.rfile
        try:
            if not self._run_fast():
                super().run_wsgi()
        finally:
            self._pending = None
            self.connection = self.request
            self.rfile = rfile

    def _refuse_length(self) -> None:
        """400 and close, as an HTTP server must for a Content-Length it cannot read (RFC
        9112 6.3): where the body ends is unknown, so the connection cannot go on. (Python
        takes "²" for a digit: werkzeug read such a length as 0 bytes, and our own
        int() of it failed with no answer at all.)"""
        message = "Content-Length: expected one whole number of bytes in ASCII digits"
        body = json.dumps(error_envelope(400, message), separators=(",", ":")).encode() + b"\n"
        self.close_connection = True
        self._reusable = False
        self.send_response(400, "BAD REQUEST")  # werkzeug's wording, as its other answers
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _run_fast(self) -> bool:
        """Answer a submit through the app's FastSubmit, without werkzeug's runner; False
        (the request untouched, its environ kept for make_environ) when it is not one."""
        fast: FastSubmit | None = self.server.fast_submit  # type: ignore[attr-defined]
        if fast is None or self.headers.get("Expect"):  # werkzeug answers 100-continue
            return False
        environ = self._pending = self.make_environ()
        if not self._reusable:  # a body not read whole: werkzeug's runner streams it
            return False
        answer = fast.answer(environ)
        if answer is None:
            return False
        self._pending = None
        self.environ = environ
        status, headers, body = answer
        code, _, message = status.partition(" ")
        try:
            # What werkzeug's runner writes for an answer with a Content-Length.
            self.send_response(int(code), message)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Connection", "close")  # keep-alive, see send_header
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except (ConnectionError, TimeoutError) as exc:  # e.g. a dropped connection
            self.connection_dropped(exc, environ)
        return True

    def finish(self) -> None:
        try:
            super().finish()
        except ConnectionError:
            # The client is gone, or the sim hung up on it (a lost answer, see
            # app.drop_connection): the unsent answer left in the buffer goes with it,
            # rather than as a traceback on stderr.
            with contextlib.suppress(OSError):
                self.rfile.close()

    def send_header(self, keyword: str, value: str) -> None:
        if keyword.lower() == "connection" and value.lower() == "close" and self._reusable:
            value = "keep-alive"  # werkzeug always asks to close; this one may stay open
        super().send_header(keyword, value)


class _PooledServer(BaseWSGIServer):
    """A werkzeug WSGI server whose connections are served by a pool of reused threads."""

    multithread = True

    def __init__(self, host: str, port: int, app: Any, handler: type[WSGIRequestHandler]) -> None:
        super().__init__(host, port, app, handler)
        # The app's submit path, which handlers call directly (None: every request to `app`).
        self.fast_submit: FastSubmit | None = getattr(app, "extensions", {}).get(
            "wavespeed_sim.fast_submit"
        )
        self._pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="sim-http")
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        self.never_readable, self._never_written = socket.socketpair()
        self.at_eof, peer = socket.socketpair()
        peer.close()  # so `at_eof` is always readable, and reads nothing

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        self._pool.submit(self._serve, request, client_address)

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            with self._open_lock:
                self._open.discard(request)
            self.shutdown_request(request)

    def server_close(self) -> None:
        """Close the listening socket and every open connection; wait for the threads."""
        socketserver.TCPServer.server_close(self)
        with self._open_lock:
            for conn in list(self._open):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.never_readable.close()
        self._never_written.close()
        self.at_eof.close()


class _QuietHandler(_KeepAliveHandler):
    """No access log line per request (the request log at /_sim/requests has them all)."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Say nothing."""


class _LoudHandler(_KeepAliveHandler):
    """werkzeug's usual access log (``--log-requests``)."""


class SimServer:
    """A running simulator: ``start()``/``stop()`` for tests, ``serve_forever()`` for the CLI."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.sim = Simulator(config or SimConfig())
        self.app = create_app(self.sim)
        cfg = self.sim.config
        handler = _LoudHandler if cfg.log_requests else _QuietHandler
        # make_server binds now, so `url` is known (port 0 included) before start().
        try:
            self._server: BaseWSGIServer = _PooledServer(cfg.host, cfg.port, self.app, handler)
        except BaseException:  # werkzeug exits (SystemExit) when it cannot bind
            self.sim.stop()  # close the webhook client and pool it already made
            raise
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._server.port)

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8765`` (what a client uses as base_url)."""
        host = self.sim.config.host
        if host in {"0.0.0.0", "::", ""}:  # listening everywhere: call it locally
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def start(self) -> SimServer:
        """Serve in a background thread; returns self."""
        self.sim.start()
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": POLL_INTERVAL_S},
            name="sim-http",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, stop the scheduler and webhook sender, close the socket."""
        if self._closed:
            return
        self._closed = True
        # The engine first: it releases requests blocked in sync mode, so the server's
        # request threads can finish before the listening socket closes.
        self.sim.stop()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (KeyboardInterrupt), then clean up."""
        self.sim.start()
        try:
            self._server.serve_forever(poll_interval=POLL_INTERVAL_S)
        finally:
            self._closed = True
            self.sim.stop()
            self._server.server_close()

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
