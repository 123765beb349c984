"""Bulk enqueue: `kq batch` of a 100,000-line file vs a plain Celery `.delay()` loop.

Ours is timed as a user runs it: the `kq batch` command in its own process, which
validates every line first, then writes the jobs and queues them. The baseline sends
one `kq.submit` message per job with `.delay()` to the same Redis (no job records at
all, so it does strictly less work than ours).

Each side runs twice, in the order baseline, ours, ours, baseline, on an emptied Redis
each time, so that a drift in this shared machine's speed (±30 % within minutes here)
weighs on both sides alike; each side's rate is its jobs over its runs' time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench.common import Row, private_redis

GOAL_RATIO = 20.0


# The order of the runs: a steady drift in the machine's speed costs both sides alike.
ROUNDS = ("baseline", "ours", "ours", "baseline")


def run(*, quick: bool) -> list[Row]:
    lines = 5_000 if quick else 100_000
    baseline_n = 2_000 if quick else 10_000
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
        client = redis.Redis.from_url(redis_url)
        seconds = {"ours": 0.0, "baseline": 0.0}
        jobs = {"ours": 0, "baseline": 0}
        try:
            for side in ROUNDS:
                client.flushall()
                if side == "ours":
                    seconds[side] += _kq_batch(path, env)
                    jobs[side] += lines
                else:
                    seconds[side] += baseline_n / _delay_loop(redis_url, baseline_n)
                    jobs[side] += baseline_n
        finally:
            client.close()
    ours, baseline = (jobs[side] / seconds[side] for side in ("ours", "baseline"))
    return [
        Row.higher_is_better(
            "bulk enqueue",
            f"`kq batch` of {lines:,} lines vs .delay() loop",
            ours,
            baseline,
            "jobs/s",
            GOAL_RATIO,
            note="ours includes interpreter start-up and validating every line first; "
            f"runs {'-'.join(ROUNDS)}",
        )
    ]


def _kq_batch(path: Path, env: dict[str, str]) -> float:
    """Seconds a `kq batch` of the file takes, start-up included."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "kq.cli", "batch", str(path), "--batch-id", "bench"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


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
