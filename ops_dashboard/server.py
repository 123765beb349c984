"""`kq dashboard`: the ops app under gunicorn (one process, a few threads: a handful of viewers)."""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication

from ops_dashboard.app import create_app
from worker import runtime
from worker.settings import Settings

DEFAULT_THREADS = 4


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings, token: str, options: dict[str, Any]) -> None:
        self._settings = settings
        self._token = token
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        # Built in the worker process, after the fork: the Redis pool is not shared.
        return create_app(
            client=runtime.make_redis(self._settings),
            token=self._token,
            deadline_s=self._settings.job_deadline_s,
            webhooks_enabled=self._settings.webhooks_enabled,
        )


def serve(settings: Settings, token: str, *, host: str = "127.0.0.1", port: int = 8090) -> None:
    """Run the dashboard in the foreground until SIGTERM / Ctrl-C."""
    _Gunicorn(
        settings,
        token,
        {
            "bind": f"{host}:{port}",
            "workers": 1,
            "threads": DEFAULT_THREADS,
            "worker_class": "gthread",
            "timeout": 30,
            "graceful_timeout": 5,
            # No access log: a `/login?token=` link must not land in a log file.
            "accesslog": None,
            "errorlog": "-",
            "loglevel": "warning",
        },
    ).run()
