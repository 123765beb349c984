"""`kq receiver`: the app under gunicorn (gthread workers: I/O-bound, short requests)."""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication

from webhook_receiver.app import create_app
from worker.settings import Settings

DEFAULT_WORKERS = 2
DEFAULT_THREADS = 8
# A slow client (slow-loris) gets this long before its worker thread is freed.
DEFAULT_TIMEOUT_S = 30


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings, options: dict[str, Any]) -> None:
        self._settings = settings
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return create_app(self._settings)


def serve(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    workers: int = DEFAULT_WORKERS,
    threads: int = DEFAULT_THREADS,
) -> None:
    """Run the receiver in the foreground until SIGTERM / Ctrl-C."""
    _Gunicorn(
        settings,
        {
            "bind": f"{host}:{port}",
            "workers": workers,
            "threads": threads,
            "worker_class": "gthread",
            "timeout": DEFAULT_TIMEOUT_S,
            "graceful_timeout": 10,
            "keepalive": 5,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": "warning",
        },
    ).run()
