"""``SimServer``: the simulator on a real socket, in a background thread or in the foreground.

werkzeug's threaded server answers each request in its own thread and always closes the
connection after the response, so stopping never waits on idle keep-alive clients.

    with SimServer(SimConfig(port=0, inference_time_s=0.1)) as server:
        httpx.get(server.url + "/_sim/health")
"""

from __future__ import annotations

import threading
from types import TracebackType

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from wavespeed_sim.app import create_app
from wavespeed_sim.config import SimConfig
from wavespeed_sim.engine import Simulator

POLL_INTERVAL_S = 0.1  # how quickly serve_forever notices shutdown()


class _QuietHandler(WSGIRequestHandler):
    """No access log line per request (the request log at /_sim/requests has them all)."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Say nothing."""


class _LoudHandler(WSGIRequestHandler):
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
            self._server: BaseWSGIServer = make_server(
                cfg.host, cfg.port, self.app, threaded=True, request_handler=handler
            )
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
