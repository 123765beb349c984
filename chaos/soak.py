"""The soak variant (`python -m chaos --soak`): many jobs, short record TTL, memory watched.

Every few seconds it samples Redis's memory and key count and the worker's resident
memory. The steady state is the part of the push after the first records have expired
(from `RESULT_TTL_S` on): over it, Redis memory must level off and the worker's RSS stay
flat (the second half's peak, or median, within `GROWTH_LIMIT` of the first half's);
and no key that should expire may lack a TTL. Big keys without a TTL (a batch's member
list, the capped event stream) are listed with their sizes.
"""

from __future__ import annotations

import statistics
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from chaos.invariants import Check

if TYPE_CHECKING:
    from chaos.runner import ChaosRun

SAMPLE_EVERY_S = 5.0
RESULT_TTL_S = 60.0  # what chaos.runner sets KQ_RESULT_TTL_S to for a soak
# "Levels off": the last third's peak within this factor of the middle third's peak.
GROWTH_LIMIT = 1.3
# Key patterns whose every key must carry a TTL (job records: once terminal).
EXPIRING = ("kq:pred:*", "kq:whid:*")


@dataclass(frozen=True)
class Sample:
    t: float
    redis_bytes: int
    keys: int
    worker_rss_kb: int
    terminal: int


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class SoakMonitor:
    """Samples memory while a soak run goes on; `stop_and_report()` gives the verdict."""

    def __init__(self, chaos: ChaosRun) -> None:
        self._chaos = chaos
        self._redis: redis.Redis = redis.Redis.from_url(
            chaos.settings.redis_url, decode_responses=True, socket_timeout=10
        )
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="chaos-soak", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            try:
                info: Any = self._redis.info("memory")
                keys = int(self._redis.dbsize())
            except redis.RedisError:
                continue
            worker = self._chaos.stack.procs.get("worker")
            seen = self._chaos.observer.seen
            self.samples.append(
                Sample(
                    t=self._chaos.elapsed(),
                    redis_bytes=int(info["used_memory"]),
                    keys=keys,
                    worker_rss_kb=_rss_kb(worker.pid) if worker is not None else 0,
                    terminal=sum(1 for v in seen.events.values() if v),
                )
            )

    def stop_and_report(self) -> tuple[list[str], list[Check]]:
        self._stop.set()
        self._thread.join(SAMPLE_EVERY_S * 2)
        lines = ["soak samples (elapsed s, Redis used MB, keys, worker RSS MB, terminal jobs):"]
        step = max(1, len(self.samples) // 20)
        for s in self.samples[::step]:
            lines.append(
                f"  {s.t:7.0f}  {s.redis_bytes / 1e6:8.1f}  {s.keys:7d}  "
                f"{s.worker_rss_kb / 1e3:7.1f}  {s.terminal:7d}"
            )
        checks = [self._levels_off(), self._rss_flat(), self._ttls(lines)]
        self._redis.close()
        return lines, checks

    def _halves(self) -> tuple[list[Sample], list[Sample]]:
        """The steady state (records expiring, jobs still arriving), split in two."""
        end = self._chaos.config.push_s
        steady = [s for s in self.samples if RESULT_TTL_S + 15 <= s.t <= end]
        return steady[: len(steady) // 2], steady[len(steady) // 2 :]

    def _levels_off(self) -> Check:
        first, second = self._halves()
        if not first or not second:
            return Check("Redis memory levels off", False, "too few steady-state samples")
        a = max(s.redis_bytes for s in first)
        b = max(s.redis_bytes for s in second)
        counts = (
            f"steady-state peak {a / 1e6:.1f} MB in the first half, {b / 1e6:.1f} MB in "
            f"the second (+{(b / a - 1) * 100:.0f} %)"
        )
        return Check("Redis memory levels off", b <= a * GROWTH_LIMIT, counts)

    def _rss_flat(self) -> Check:
        first, second = self._halves()
        if not first or not second:
            return Check("worker RSS flat", False, "too few steady-state samples")
        a = statistics.median(s.worker_rss_kb for s in first)
        b = statistics.median(s.worker_rss_kb for s in second)
        counts = (
            f"steady-state median {a / 1e3:.1f} MB in the first half, {b / 1e3:.1f} MB in "
            f"the second (+{(b / a - 1) * 100:.0f} %)"
        )
        return Check("worker RSS flat", b <= a * GROWTH_LIMIT, counts)

    def _ttls(self, lines: list[str]) -> Check:
        missing: list[str] = []
        checked = 0
        for pattern in ("kq:job:*", *EXPIRING):
            for key in self._redis.scan_iter(match=pattern, count=1000):
                if pattern == "kq:job:*" and self._redis.hget(key, "state") not in (
                    "completed",
                    "failed",
                    "cancelled",
                ):
                    continue
                checked += 1
                if self._redis.ttl(key) == -1:
                    missing.append(str(key))
        sizes = []
        for key in self._redis.scan_iter(match="kq:*", count=1000):
            kind = self._redis.type(key)
            if self._redis.ttl(key) == -1 and kind in ("list", "zset", "set", "hash", "stream"):
                size = {
                    "list": self._redis.llen,
                    "zset": self._redis.zcard,
                    "set": self._redis.scard,
                    "hash": self._redis.hlen,
                    "stream": self._redis.xlen,
                }[kind](key)
                if size > 1000:
                    sizes.append(f"{key} ({kind}, {size})")
        lines.append("big keys without a TTL: " + (", ".join(sorted(sizes)) or "none"))
        counts = f"{checked} expiring keys checked, {len(missing)} without a TTL"
        return Check("no key without its expiry", not missing, counts, tuple(missing[:5]))
