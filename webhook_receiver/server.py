"""`kq receiver`: the app under gunicorn (gthread workers: I/O-bound, short requests)."""

from __future__ import annotations

from flask import Flask

from webhook_receiver.app import create_app
from worker.settings import Settings
from worker.wsgi_server import serve as serve_wsgi

DEFAULT_WORKERS = 2
DEFAULT_THREADS = 8
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
