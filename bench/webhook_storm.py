"""Webhook storm: 5,000 deliveries within a few seconds (the provider finishing a wave).

The same genuine signed completions as `bench.receiver` (one per real job in state
`submitted`), sent by more connections at once (LOAD_PROCESSES x THREADS_PER_PROCESS,
as a provider's sender pool would), each sent once. Rows: all of them applied (an event
each, counted in Redis), and the p99 of each delivery's answer time (verify, dedupe,
apply, answer) against the p99 of a bare Flask 204 under the same storm.
"""

from __future__ import annotations

from bench.common import Row
from bench.loadgen import LoadResult, Request, blast
from bench.receiver import receiver_and_bare
from worker import keys

SCENARIO = "webhook storm"
P99_GOAL = 1.5
LOAD_PROCESSES = 2
THREADS_PER_PROCESS = 32


def run(*, quick: bool) -> list[Row]:
    n = 300 if quick else 5_000
    deadline_s = 30.0 if quick else 60.0
    with receiver_and_bare(n) as (stack, store, bare_url, sign):
        assert stack.receiver_url is not None
        base = _storm(bare_url, sign(), deadline_s)
        stack.procs["bare-flask"].stop()
        ours = _storm(stack.receiver_url, sign(), deadline_s)
        applied = int(store.redis.xlen(keys.EVENTS))
    seconds = ours.finished - ours.started
    return [
        Row.higher_is_better(
            SCENARIO,
            f"{n:,} deliveries: applied (an event each) vs sent",
            applied,
            n,
            "jobs",
            1.0,
            note=f"ours took {seconds:.1f} s ({ours.rate:,.0f}/s), bare Flask "
            f"{base.finished - base.started:.1f} s; answers {dict(ours.statuses)}",
        ),
        Row.lower_is_better(
            SCENARIO,
            "p99 apply latency vs bare Flask p99, same storm",
            ours.percentile_ms(0.99),
            base.percentile_ms(0.99),
            "ms",
            P99_GOAL,
            note=f"p50 {ours.percentile_ms(0.5):.1f} ms vs {base.percentile_ms(0.5):.1f} ms; "
            f"{LOAD_PROCESSES * THREADS_PER_PROCESS} connections",
        ),
    ]


def _storm(base_url: str, deliveries: list[Request], deadline_s: float) -> LoadResult:
    return blast(
        base_url,
        deliveries,
        processes=LOAD_PROCESSES,
        threads=THREADS_PER_PROCESS,
        deadline_s=deadline_s,
    )
