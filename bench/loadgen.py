"""A small HTTP load generator that runs in its own processes (stdlib only).

`blast()` splits prepared requests over a few child processes (`python -m
bench.loadgen`, fed JSON on stdin, answering JSON on stdout: no multiprocessing
start-method rules, and the children import nothing but the standard library, so
they start fast). Each child runs a few threads, one keep-alive `http.client`
connection each: the cheapest client Python has, so on a small shared machine as
much CPU as possible is left to the server being measured.

Bounded twice: each request is sent at most once, and nothing is sent after the
deadline. Only loopback hosts are accepted.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

# Its own copy of bench.common.REPO_ROOT: this module imports the standard library only.
REPO_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Time for the children to start before they all begin at the same instant.
START_GRACE_S = 1.5


@dataclass(frozen=True)
class Request:
    """One prepared POST: path with query, headers, raw body."""

    target: str
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True)
class LoadResult:
    """What a load run saw: answers by status (0 = no answer), latencies in seconds,
    the Unix time of the first send and of the last answer."""

    statuses: dict[int, int]
    latencies: list[float]
    started: float
    finished: float

    @property
    def accepted(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    @property
    def rate(self) -> float:
        """Accepted requests per second of wall time."""
        return self.accepted / max(self.finished - self.started, 1e-9)

    def percentile_ms(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] * 1000


def blast(
    base_url: str,
    requests: Sequence[Request],
    *,
    processes: int,
    threads: int,
    deadline_s: float,
) -> LoadResult:
    """POST every request once to `base_url` from `processes` x `threads` connections."""
    _check_loopback(base_url)
    go_at = time.time() + START_GRACE_S
    stop_at = go_at + deadline_s
    children = []
    for i in range(processes):
        job = {
            "base_url": base_url,
            "threads": threads,
            "go_at": go_at,
            "stop_at": stop_at,
            "requests": [
                [r.target, dict(r.headers), r.body.decode("latin-1")]
                for r in requests[i::processes]
            ],
        }
        child = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen"],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        children.append((child, json.dumps(job)))
    results = []
    for child, text in children:
        try:
            out, _ = child.communicate(text, timeout=START_GRACE_S + deadline_s + 60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            raise
        if child.returncode != 0:
            raise RuntimeError(f"load generator exited with {child.returncode}")
        raw = json.loads(out)
        raw["statuses"] = {int(k): v for k, v in raw["statuses"].items()}
        results.append(LoadResult(**raw))
    return merge(results)


def merge(results: Sequence[LoadResult]) -> LoadResult:
    """Several runs' answers as one (times: the first send, the last answer)."""
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    for result in results:
        for status, count in result.statuses.items():
            statuses[status] = statuses.get(status, 0) + count
        latencies.extend(result.latencies)
    return LoadResult(
        statuses,
        latencies,
        min(r.started for r in results),
        max(r.finished for r in results),
    )


def _check_loopback(base_url: str) -> None:
    host = urlsplit(base_url).hostname or ""
    if host not in LOOPBACK:
        raise ValueError(f"load goes to loopback addresses only, not {host!r}")


def _run_child(
    base_url: str, requests: Sequence[Request], threads: int, go_at: float, stop_at: float
) -> LoadResult:
    """In a child: `threads` threads, one keep-alive connection each, from `go_at`."""
    _check_loopback(base_url)
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    shares = [requests[i::threads] for i in range(threads)]
    outcomes: list[list[tuple[int, float]]] = [[] for _ in shares]
    workers = [
        threading.Thread(target=_send_all, args=(host, port, share, stop_at, out))
        for share, out in zip(shares, outcomes, strict=True)
    ]
    time.sleep(max(0.0, go_at - time.time()))
    started = time.time()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    finished = time.time()
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    for out in outcomes:
        for status, latency in out:
            statuses[status] = statuses.get(status, 0) + 1
            latencies.append(latency)
    return LoadResult(statuses, latencies, started, finished)


def _send_all(
    host: str, port: int, share: Sequence[Request], stop_at: float, out: list[tuple[int, float]]
) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        for request in share:
            if time.time() >= stop_at:
                return
            t0 = time.perf_counter()
            try:
                conn.request("POST", request.target, body=request.body, headers=request.headers)
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                conn.close()  # http.client reconnects on the next request
                status = 0
            out.append((status, time.perf_counter() - t0))
    finally:
        conn.close()


def _child_main() -> None:
    job = json.load(sys.stdin)
    requests = [Request(t, h, b.encode("latin-1")) for t, h, b in job["requests"]]
    result = _run_child(job["base_url"], requests, job["threads"], job["go_at"], job["stop_at"])
    json.dump(asdict(result), sys.stdout)


if __name__ == "__main__":
    _child_main()
