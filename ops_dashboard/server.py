"""`kq dashboard`: the ops app under gunicorn (one process, a few threads: a handful of viewers)."""

from __future__ import annotations

from flask import Flask

from ops_dashboard.app import create_app
from worker import runtime
from worker.admission import Admission
from worker.settings import Settings
from worker.wsgi_server import serve as serve_wsgi

DEFAULT_THREADS = 4


def serve(settings: Settings, token: str, *, host: str = "127.0.0.1", port: int = 8090) -> None:
    """Run the dashboard in the foreground until SIGTERM / Ctrl-C.

    gunicorn's access log stays off (as for every kq server): a `/login?token=` link
    must not land in a log file.
    """

    def build() -> Flask:
        # Built in the worker process, after the fork: the Redis pool is not shared.
        client = runtime.make_redis(settings)
        return create_app(
            client=client,
            token=token,
            deadline_s=settings.job_deadline_s,
            webhooks_enabled=settings.webhooks_enabled,
            admission=Admission(client, settings),
            # Cancel and redrive go through the producer's use cases (and its Celery queue).
            producer=runtime.make_producer(settings),
        )

    serve_wsgi(build, host=host, port=port, workers=1, threads=DEFAULT_THREADS, timeout_s=30)
