"""`kq receiver`: the app under gunicorn.

gevent workers by default: a delivery is short and spends much of its time waiting on
sockets (the provider's, Redis's), and a greenlet waits far cheaper than a thread (on 2
cores, ~1.3x the deliveries/s of gthread workers: README, benchmarks). A slow client
holds a greenlet, not one of a few threads. gthread stays available (`--worker-class`).
"""

from __future__ import annotations

from flask import Flask

from webhook_receiver.app import create_app
from worker.settings import Settings
from worker.wsgi_server import serve as serve_wsgi

DEFAULT_WORKERS = 2
DEFAULT_WORKER_CLASS = "gevent"
DEFAULT_THREADS = 8  # gthread workers only
DEFAULT_CONNECTIONS = 1000  # per worker process
# gunicorn's worker timeout (a worker silent this long is restarted).
DEFAULT_TIMEOUT_S = 30


def serve(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    workers: int = DEFAULT_WORKERS,
    threads: int = DEFAULT_THREADS,
    worker_class: str = DEFAULT_WORKER_CLASS,
    connections: int = DEFAULT_CONNECTIONS,
) -> None:
    """Run the receiver in the foreground until SIGTERM / Ctrl-C."""

    def build() -> Flask:
        return create_app(settings)

    serve_wsgi(
        build,
        host=host,
        port=port,
        workers=workers,
        threads=threads,
        timeout_s=DEFAULT_TIMEOUT_S,
        worker_class=worker_class,
        connections=connections,
    )
