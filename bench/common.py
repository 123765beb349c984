"""What every scenario shares: the result row, private stacks, simulator ground truth,
and small measuring helpers (waits with deadlines, interval overlap, process RSS).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from kq.stack import Stack, StackConfig
from worker import keys
from worker.settings import Settings

# Limits high enough never to bind: scenarios that measure our own overhead must not
# be paced by admission control (whose defaults follow a WaveSpeed tier).
UNLIMITED_ENV: Mapping[str, str] = {
    "KQ_MAX_IN_FLIGHT": "1000000",
    "KQ_MAX_SUBMITS_PER_MINUTE": "1000000",
}
# Production logs JSON; the console renderer would be an unfair (and unusual) cost.
BENCH_ENV: Mapping[str, str] = {"KQ_LOG_FORMAT": "json"}
SOURCE_IMAGE = "https://example.com/source.jpg"
# How often waits look at Redis; event times come from stream ids, not from this.
POLL_S = 0.05
NO_GOAL = "none (shown)"
REPO_ROOT = Path(__file__).resolve().parents[1]  # children that import bench run here


@dataclass(frozen=True)
class Row:
    """One measured line of the report."""

    scenario: str
    metric: str
    ours: float
    baseline: float
    unit: str
    goal: str  # e.g. ">= 10x"
    ratio: float
    met: bool
    note: str = ""

    @classmethod
    def higher_is_better(
        cls, scenario: str, metric: str, ours: float, baseline: float, unit: str, goal_ratio: float,
        note: str = "",
    ) -> Row:  # fmt: skip
        ratio = ours / baseline if baseline else float("inf")
        return cls(
            scenario, metric, ours, baseline, unit, f">= {goal_ratio:g}x", ratio,
            ratio >= goal_ratio, note,
        )  # fmt: skip

    @classmethod
    def lower_is_better(
        cls, scenario: str, metric: str, ours: float, baseline: float, unit: str, goal_ratio: float,
        note: str = "", strict: bool = False,
    ) -> Row:  # fmt: skip
        """ours / baseline must stay at or under `goal_ratio` (under it when `strict`)."""
        ratio = ours / baseline if baseline else float("inf")
        met = ratio < goal_ratio if strict else ratio <= goal_ratio
        goal = f"{'<' if strict else '<='} {goal_ratio:g}x"
        return cls(scenario, metric, ours, baseline, unit, goal, ratio, met, note)

    @classmethod
    def within(
        cls, scenario: str, metric: str, ours: float, baseline: float, unit: str, tolerance: float,
        note: str = "",
    ) -> Row:  # fmt: skip
        """ours must be within ±`tolerance` (a fraction) of the baseline, on either side."""
        ratio = ours / baseline if baseline else float("inf")
        met = abs(ratio - 1.0) <= tolerance
        return cls(
            scenario, metric, ours, baseline, unit, f"1x ± {tolerance:.0%}", ratio, met, note
        )

    @classmethod
    def reported(
        cls, scenario: str, metric: str, ours: float, baseline: float, unit: str, note: str = ""
    ) -> Row:
        """A comparison worth showing that has no goal of its own (always "met")."""
        ratio = ours / baseline if baseline else float("inf")
        return cls(scenario, metric, ours, baseline, unit, NO_GOAL, ratio, True, note)


@contextmanager
def private_redis() -> Iterator[str]:
    """A throwaway redis-server on a free port (the same launcher `kq up` uses)."""
    with tempfile.TemporaryDirectory(prefix="kq-bench-") as tmp:
        config = StackConfig(
            var_dir=Path(tmp),
            wavespeed_api_key="bench-unused",
            start_receiver=False,
            start_worker=False,
            start_beat=False,
        )
        with Stack(config, announce=lambda line: None) as stack:
            yield stack.redis_url


@contextmanager
def bench_stack(
    *,
    sim_args: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
    **config: Any,
) -> Iterator[Stack]:
    """A private stack (Redis, simulator, and whatever `config` asks for) in a temp dir.

    Its children get BENCH_ENV plus `extra_env`; logs stay in the temp dir, which goes
    away with the stack (set KQ_BENCH_KEEP=1 to keep it for a post-mortem).
    """
    keep = os.environ.get("KQ_BENCH_KEEP") == "1"
    tmp = tempfile.mkdtemp(prefix="kq-bench-") if keep else None
    with tempfile.TemporaryDirectory(prefix="kq-bench-") as scratch:
        var_dir = Path(tmp or scratch)
        stack_config = StackConfig(
            var_dir=var_dir,
            sim_args=tuple(sim_args),
            extra_env={**BENCH_ENV, **(extra_env or {})},
            **config,
        )
        with Stack(stack_config, announce=lambda line: None) as stack:
            yield stack


def stack_settings(stack: Stack) -> Settings:
    """The Settings a process of this stack would read from its environment."""
    return Settings.from_env({**os.environ, **stack.env})


def edits(n: int, tag: str) -> Iterator[dict[str, object]]:
    """`n` distinct, valid edit requests."""
    for i in range(n):
        yield {"prompt": f"{tag} edit {i}", "image": SOURCE_IMAGE}


class Sim:
    """The simulator's ground truth: its task table and request log (GET /_sim/...)."""

    def __init__(self, base_url: str) -> None:
        # trust_env=False: a proxy in the shell must never see loopback traffic.
        self._http = httpx.Client(base_url=base_url, timeout=60.0, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def tasks(self) -> list[dict[str, Any]]:
        response = self._http.get("/_sim/tasks")
        response.raise_for_status()
        return list(response.json()["tasks"])

    def requests(self, kind: str | None = None) -> list[dict[str, Any]]:
        response = self._http.get("/_sim/requests", params={"kind": kind} if kind else None)
        response.raise_for_status()
        return list(response.json()["requests"])


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = POLL_S) -> bool:
    """Poll `predicate` until true or `timeout_s` passes; returns whether it became true."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def wait_events(client: redis.Redis, count: int, timeout_s: float) -> float | None:
    """Wait until `kq:events` holds `count` entries; the Unix time of the last one.

    The time comes from the stream id (Redis's clock in ms, the same host clock), so
    how often we look does not blur the measurement. None if the deadline passed.
    """
    if not wait_until(lambda: int(client.xlen(keys.EVENTS)) >= count, timeout_s):
        return None
    last: Any = client.xrevrange(keys.EVENTS, count=1)
    entry_id = last[0][0]
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(text.split("-", 1)[0]) / 1000.0


@contextmanager
def timed_batch(stack: Stack, n: int, tag: str, timeout_s: float) -> Iterator[tuple[float, Sim]]:
    """Enqueue `n` edits as one batch, wait for all `n` result events; yields the seconds
    from enqueue to the last event, and the simulator (for its ground truth)."""
    from worker.runtime import make_producer

    assert stack.sim_url is not None
    producer = make_producer(stack_settings(stack))
    client = redis.Redis.from_url(stack.redis_url)
    sim = Sim(stack.sim_url)
    try:
        started = time.time()
        producer.enqueue_batch(edits(n, tag), batch_id=f"bench-{tag}")
        finished = wait_events(client, n, timeout_s)
        if finished is None:
            done = int(client.xlen(keys.EVENTS))
            raise RuntimeError(f"only {done} of {n} jobs finished within {timeout_s:g} s")
        yield finished - started, sim
    finally:
        sim.close()
        client.close()
        producer.close()


def max_overlap(intervals: Sequence[tuple[float, float]]) -> int:
    """The largest number of [start, end) intervals that are open at one instant."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    # Ends sort before starts at the same instant (-1 < 1): a slot freed and refilled at
    # the same millisecond is not counted twice.
    most = current = 0
    for _, step in edges:
        current += step
        most = max(most, current)
    return most


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (gunicorn's workers, say), from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time used so far by these processes (all their threads)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited: its time is lost to us, and says so by being small
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def cpu_snapshot(groups: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """CPU seconds so far per named group of processes, plus "bench" (this process)."""
    return {
        **{name: cpu_seconds(pids) for name, pids in groups.items()},
        "bench": time.process_time(),
    }


def cpu_per_job_ms(
    before: Mapping[str, float], after: Mapping[str, float], jobs: int
) -> dict[str, float]:
    """Milliseconds of CPU per job, per group, between two snapshots."""
    return {name: (after[name] - before[name]) * 1000 / jobs for name in before}
