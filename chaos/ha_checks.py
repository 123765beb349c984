"""Evidence and checks for runs across a Redis failover (`tests/test_sentinel.py`, `cluster/`).

They reuse `chaos.invariants` where it fits: the checks there read the job records and
the event stream (read here once, at the end, from whichever server is primary then: an
event read earlier from a primary that died may be gone, see the README) and the
simulator's ground truth (`GET /_sim/tasks`). Added here: the provider's concurrency cap
held across every worker host, from the tasks' own start and end times.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from chaos import invariants
from chaos.invariants import Check, Evidence
from chaos.observer import Observations
from worker import keys
from worker.admission import Admission
from worker.settings import Settings
from worker.store import JobStore


def gather(
    store: JobStore,
    settings: Settings,
    sim_url: str,
    ids: Sequence[str],
    prompts: Mapping[str, str],
) -> Evidence:
    """Everything the checks need, read after the run has settled."""
    seen = Observations()
    events: dict[str, list[dict[str, str]]] = defaultdict(list)
    for _entry_id, fields in store.events():
        events[fields["job_id"]].append(fields)
    seen.events = events
    jobs = dict(zip(ids, store.get_many(list(ids)), strict=True))
    with httpx.Client(timeout=30, trust_env=False) as http:
        tasks = http.get(f"{sim_url}/_sim/tasks").json()["tasks"]
    stats: dict[str, str] = store.redis.hgetall(keys.STATS)  # type: ignore[assignment]
    return Evidence(
        ids=list(ids),
        prompts=prompts,
        jobs=jobs,
        seen=seen,
        tasks=tasks,
        stats={k: int(v) for k, v in stats.items()},
        admission=Admission(store.redis, settings).snapshot(time.time()),
    )


def provider_cap_held(tasks: Sequence[Mapping[str, Any]], cap: int) -> Check:
    """At no moment did the provider run more of our tasks than KQ_MAX_IN_FLIGHT: the
    slots are shared through Redis by every worker, on every host, across failovers."""
    edges: list[tuple[float, int]] = []
    for task in tasks:
        start, end = task.get("submitted_at"), task.get("finished_at")
        if start is None:
            continue
        edges.append((float(start), 1))
        edges.append((float(end) if end is not None else float("inf"), -1))
    peak = current = 0
    for _, step in sorted(edges, key=lambda edge: (edge[0], edge[1])):
        current += step
        peak = max(peak, current)
    counts = f"at most {peak} tasks running at the provider at once (cap {cap})"
    return Check("admission cap never exceeded", peak <= cap, counts)


def every_paid_task_kept(ev: Evidence) -> Check:
    """Every task we paid for ended as its own job's result: a failover that lost a job's
    `submitted` record and its webhook's effect must not leave the task unattributed
    (the job failed `submit_ambiguous` while its task completed)."""
    kept: dict[str, str] = {}
    for job_id in ev.ids:
        events = ev.seen.events.get(job_id, [])
        if len(events) == 1:
            kept[job_id] = events[0].get("prediction_id", "")
    wanted = set(ev.ids)
    lost = [
        f"{invariants.task_job(t)}: task {t['id']} ({t['status']}) not kept by its job"
        for t in ev.tasks
        if invariants.task_job(t) in wanted and kept.get(invariants.task_job(t)) != t["id"]
    ]
    counts = f"{len(ev.tasks) - len(lost)}/{len(ev.tasks)} paid tasks kept by their own job"
    return Check("every paid task kept by its job", not lost, counts, tuple(lost[:5]))


def check_failover_run(ev: Evidence, cap: int) -> list[Check]:
    """The invariants a failover run must hold, in the order they are printed."""
    return [
        invariants.every_job_terminal(ev),
        invariants.one_event_per_job(ev),
        invariants.outputs_match_the_simulator(ev),
        invariants.paid_once(ev),
        every_paid_task_kept(ev),
        provider_cap_held(ev.tasks, cap),
        invariants.gauges_back_to_zero(ev),
        invariants.no_slot_leaked(ev),
    ]
