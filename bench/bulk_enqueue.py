"""Bulk enqueue: `kq batch` of a 100,000-line file vs a plain Celery `.delay()` loop.

Ours is timed as a user runs it: the `kq batch` command in its own process, which
validates every line first, then writes the jobs and queues them. The baseline sends
one `kq.submit` message per job with `.delay()` to the same Redis (no job records at
all, so it does strictly less work than ours).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Row, private_redis

GOAL_RATIO = 20.0


def run(*, quick: bool) -> list[Row]:
    lines = 5_000 if quick else 100_000
    baseline_n = 2_000 if quick else 20_000
    with private_redis() as redis_url, tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "edits.jsonl"
        with path.open("w") as fh:
            for i in range(lines):
                fh.write(json.dumps({"prompt": f"edit {i}", "image": f"https://e.com/{i}.jpg"}))
                fh.write("\n")
        env = {
            **os.environ,
            "KQ_REDIS_URL": redis_url,
            "KQ_VAR_DIR": str(Path(tmp) / "var"),
            "WAVESPEED_API_KEY": "bench-unused",
        }
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "kq.cli", "batch", str(path), "--batch-id", "bench"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        ours = lines / (time.perf_counter() - started)
        baseline = _delay_loop(redis_url, baseline_n)
    return [
        Row.higher_is_better(
            "bulk enqueue",
            f"`kq batch` of {lines:,} lines vs .delay() loop",
            ours,
            baseline,
            "jobs/s",
            GOAL_RATIO,
            note="ours includes interpreter start-up and validating every line first",
        )
    ]


def _delay_loop(redis_url: str, n: int) -> float:
    """`.delay()` n times in a fresh process (so no Celery state is shared with ours)."""
    code = (
        "import sys, time\n"
        "from worker.celery_app import app\n"
        f"app.conf.broker_url = {redis_url!r}\n"
        "from worker.tasks import submit\n"
        "submit.delay('warm-up')\n"
        "t = time.perf_counter()\n"
        f"for i in range({n}): submit.delay('0' * 32)\n"
        f"print({n} / (time.perf_counter() - t))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])
