"""What a run was measured on: the package versions that carry the hot paths, and how
fast the machine was at the start and the end of the run.

Ratios compare two sides of one run, yet they still move with the machine: a baseline
bound by latency (a no-op Celery task) loses less on a slow hour than a side bound by
CPU. The speed probe makes runs of different hours (or days) comparable: a fixed piece
of pure-Python work of the kind our hot paths do (JSON, hashing, dicts, string
formatting), timed best of several tries; lower is faster.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from importlib import metadata
from typing import Any

# The libraries whose versions have moved a row measurably (redis-py's command packing,
# gunicorn's request handling, Celery/kombu's message path, hiredis's parser).
PACKAGES = ("redis", "hiredis", "celery", "kombu", "gunicorn", "flask", "httpx", "structlog")
TRIES = 5


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _reference_work() -> None:
    payload: dict[str, Any] = {"status": "completed", "outputs": ["https://example.com/a.jpg"]}
    for i in range(5_000):
        payload["id"] = f"{i:032x}"
        body = json.dumps(payload, separators=(",", ":")).encode()
        hashlib.sha256(body).hexdigest()
        json.loads(body)


def speed_ms() -> float:
    """Milliseconds the reference work takes, best of TRIES after an untimed one (an idle
    virtual CPU is slow for its first fraction of a second); lower is faster."""
    _reference_work()
    best = float("inf")
    for _ in range(TRIES):
        started = time.perf_counter()
        _reference_work()
        best = min(best, time.perf_counter() - started)
    return best * 1000
