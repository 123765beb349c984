"""Webhook storm: 5,000 deliveries within a few seconds (the provider finishing a wave).

The same genuine signed completions as `bench.receiver` (one per real job in state
`submitted`), sent by more connections at once (LOAD_PROCESSES x THREADS_PER_PROCESS,
as a provider's sender pool would), each sent once; two storms a side, in the rounds of
`bench.receiver` (bare, ours, ours, bare), so that the machine's drift weighs on both.
Rows: all of them applied (an event each, counted in Redis), and the p99 of each
delivery's answer time (verify, dedupe, apply, answer) against the p99 of a bare Flask
204 under the same storms.
"""

from __future__ import annotations

from functools import partial

from bench.common import Row
from bench.loadgen import LoadResult, Request, blast
from bench.receiver import ROUNDS, in_rounds, receiver_and_bare
from worker import keys

SCENARIO = "webhook storm"
P99_GOAL = 1.5
LOAD_PROCESSES = 2
THREADS_PER_PROCESS = 32


def run(*, quick: bool) -> list[Row]:
    n = 300 if quick else 5_000
    deadline_s = 30.0 if quick else 60.0
    rounds = ROUNDS.count("ours")
    with receiver_and_bare(rounds * n) as (stack, store, urls, sign):
        sides = in_rounds(stack, urls, sign(), partial(_storm, deadline_s=deadline_s))
        base, ours = sides["bare"], sides["ours"]
        applied = int(store.redis.xlen(keys.EVENTS))
    sent = len(ours.answers.latencies)
    storms = " and ".join(f"{run.finished - run.started:.1f} s" for run in ours.runs)
    bare_storms = " and ".join(f"{run.finished - run.started:.1f} s" for run in base.runs)
    return [
        Row.higher_is_better(
            SCENARIO,
            f"{rounds} storms of {n:,} deliveries: applied (an event each) vs sent",
            applied,
            sent,
            "jobs",
            1.0,
            note=f"ours took {storms}, bare Flask {bare_storms}; "
            f"answers {dict(ours.answers.statuses)}",
        ),
        Row.lower_is_better(
            SCENARIO,
            "p99 apply latency vs bare Flask p99, same storms",
            ours.answers.percentile_ms(0.99),
            base.answers.percentile_ms(0.99),
            "ms",
            P99_GOAL,
            note=f"p50 {ours.answers.percentile_ms(0.5):.1f} ms vs "
            f"{base.answers.percentile_ms(0.5):.1f} ms; "
            f"{LOAD_PROCESSES * THREADS_PER_PROCESS} connections; rounds {'-'.join(ROUNDS)}",
        ),
    ]


def _storm(base_url: str, deliveries: list[Request], *, deadline_s: float) -> LoadResult:
    return blast(
        base_url,
        deliveries,
        processes=LOAD_PROCESSES,
        threads=THREADS_PER_PROCESS,
        deadline_s=deadline_s,
    )
