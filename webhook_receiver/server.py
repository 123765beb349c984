"""`kq receiver`: the app under gunicorn (gthread workers: I/O-bound, short requests)."""

from __future__ import annotations

from flask import Flask

from webhook_receiver.app import create_app
from worker.settings import Settings
from worker.wsgi_server import serve as serve_wsgi

# 16 server threads as 4 processes of 4, not 2 of 8: a delivery's Redis round trip hands
# the GIL to its process's other threads and takes it back, and fewer threads to a GIL
# cost less CPU per delivery (`make bench` on 2 cores, 12-04: deliveries/s 0.53-0.62x of
# a bare Flask 204 with the same settings against 0.50-0.61x, p99 1.13-1.34x against
# 1.29-1.64x); as many slow clients are held at once as before (see BodyDeadline).
DEFAULT_WORKERS = 4
DEFAULT_THREADS = 4
# A slow client (slow-loris) gets this long before its worker thread is freed.
DEFAULT_TIMEOUT_S = 30


def serve(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    workers: int = DEFAULT_WORKERS,
    threads: int = DEFAULT_THREADS,
) -> None:
    """Run the receiver in the foreground until SIGTERM / Ctrl-C."""

    def build() -> Flask:
        return create_app(settings)

    serve_wsgi(
        build, host=host, port=port, workers=workers, threads=threads, timeout_s=DEFAULT_TIMEOUT_S
    )
