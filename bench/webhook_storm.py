"""Webhook storm: 5,000 deliveries within a few seconds (the provider finishing a wave).

The same genuine signed completions as `bench.receiver` (one per real job in state
`submitted`), sent by more connections at once (LOAD_PROCESSES x THREADS_PER_PROCESS,
as a provider's sender pool would), each sent once. Rows: all of them applied (an event
each, counted in Redis), and the p99 of each delivery's answer time (verify, dedupe,
apply, answer) against the p99 of a bare Flask 204 under the same storm.
"""

from __future__ import annotations

import base64
import secrets

from bench.common import Row, bench_stack, stack_settings
from bench.loadgen import LoadResult, Request, blast
from bench.receiver import _prepare, _sign, _start_bare
from worker import keys
from worker.runtime import make_store

SCENARIO = "webhook storm"
P99_GOAL = 1.5
LOAD_PROCESSES = 2
THREADS_PER_PROCESS = 32


def run(*, quick: bool) -> list[Row]:
    n = 300 if quick else 5_000
    deadline_s = 30.0 if quick else 60.0
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    with bench_stack(
        extra_env={"KQ_WEBHOOK_SECRET": secret}, start_worker=False, start_beat=False
    ) as stack:
        settings = stack_settings(stack)
        store = make_store(settings)
        assert stack.receiver_url is not None
        try:
            jobs = _prepare(store, n)
            bare_url = _start_bare(stack)
            base = _storm(bare_url, _sign(jobs, settings.secret_key, secret), deadline_s)
            stack.procs["bare-flask"].stop()
            ours = _storm(stack.receiver_url, _sign(jobs, settings.secret_key, secret), deadline_s)
            applied = int(store.redis.xlen(keys.EVENTS))
        finally:
            store.redis.close()
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
