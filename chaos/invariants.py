"""The promises a chaos run checks, each against the simulator's own ground truth.

Every check returns a `Check`: its name, whether it held, the counts it rests on (always
printed, pass or fail) and a few examples when it did not hold. The evidence is gathered
once, after the run has settled (`Evidence`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from chaos.observer import Observations
from worker.admission import Snapshot
from worker.domain import TERMINAL_STATES, Job

EXAMPLES = 5
_TERMINAL = frozenset(s.value for s in TERMINAL_STATES)


@dataclass(frozen=True)
class Check:
    """One invariant's verdict."""

    name: str
    ok: bool
    counts: str
    examples: tuple[str, ...] = ()


@dataclass
class Evidence:
    """Everything the checks look at, collected after the run."""

    ids: Sequence[str]
    prompts: Mapping[str, str]
    jobs: Mapping[str, Job | None]  # None: expired (or never written)
    seen: Observations
    tasks: Sequence[Mapping[str, Any]]  # GET /_sim/tasks
    killed_in_flight: set[str] = field(default_factory=set)  # `submitting` when -9 landed
    stats: Mapping[str, int] = field(default_factory=dict)
    log_leaks: Mapping[str, list[str]] = field(default_factory=dict)
    admission: Snapshot | None = None  # after the run; None: admission control is off
    expired_ok: bool = False  # soak: records may be gone (TTL); events stand in for them


def task_job(task: Mapping[str, Any]) -> str:
    """The job a task was submitted for, from the webhook URL it carries."""
    hook = str(task.get("webhook") or "")
    return parse_qs(urlsplit(hook).query).get("job", [""])[0]


def _final_event(ev: Evidence, job_id: str) -> dict[str, str] | None:
    events = ev.seen.events.get(job_id, [])
    return events[0] if len(events) == 1 else None


def every_job_terminal(ev: Evidence) -> Check:
    states: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    stuck: list[str] = []
    for job_id in ev.ids:
        job = ev.jobs.get(job_id)
        event = _final_event(ev, job_id)
        if job is not None:
            state, reason = job.state.value, job.reason
        elif ev.expired_ok and event is not None:
            state, reason = event["state"], event.get("reason", "")
        else:
            state, reason = "missing", ""
        states[state] += 1
        if state in _TERMINAL:
            if state != "completed":
                reasons[reason or "?"] += 1
        else:
            stuck.append(f"{job_id} is {state}")
    done = sum(n for s, n in states.items() if s in _TERMINAL)
    why = ", ".join(f"{n} {r}" for r, n in reasons.most_common())
    counts = (
        f"{done}/{len(ev.ids)} terminal: {states['completed']} completed, "
        f"{states['failed']} failed ({why or 'none'}), {states['cancelled']} cancelled"
    )
    return Check("every job terminal", not stuck, counts, tuple(stuck[:EXAMPLES]))


def one_event_per_job(ev: Evidence) -> Check:
    wanted = set(ev.ids)
    bad = [
        f"{job_id}: {len(ev.seen.events.get(job_id, []))} events"
        for job_id in ev.ids
        if len(ev.seen.events.get(job_id, [])) != 1
    ]
    foreign = sum(len(v) for k, v in ev.seen.events.items() if k not in wanted)
    total = sum(len(v) for v in ev.seen.events.values())
    counts = (
        f"{len(ev.ids) - len(bad)}/{len(ev.ids)} jobs with exactly one event; "
        f"{total} events read, {foreign} for unknown jobs"
    )
    examples = bad[:EXAMPLES] + ([f"{foreign} foreign events"] if foreign else [])
    return Check(
        "exactly one terminal event per job", not bad and not foreign, counts, tuple(examples)
    )


def nothing_moved_backwards(ev: Evidence) -> Check:
    disagree: list[str] = []
    for job_id in ev.ids:
        job, event = ev.jobs.get(job_id), _final_event(ev, job_id)
        if job is None or event is None:
            continue
        if event["state"] != job.state.value or int(event["version"]) != job.version:
            disagree.append(
                f"{job_id}: event {event['state']} v{event['version']}, "
                f"record {job.state.value} v{job.version}"
            )
    problems = ev.seen.backward + disagree
    counts = (
        f"{ev.seen.samples} sampling rounds, {len(ev.seen.last_seen)} jobs observed, "
        f"{len(ev.seen.backward)} backward moves, {len(disagree)} records moved after "
        "their event"
    )
    return Check("no state moved backwards", not problems, counts, tuple(problems[:EXAMPLES]))


def outputs_match_the_simulator(ev: Evidence) -> Check:
    tasks = {str(t["id"]): t for t in ev.tasks}
    completed = matched = failed_by_provider = 0
    problems: list[str] = []
    for job_id in ev.ids:
        event = _final_event(ev, job_id)
        if event is None:
            continue
        task = tasks.get(event.get("prediction_id", ""))
        if event["state"] == "completed":
            completed += 1
            outputs = json.loads(event.get("outputs") or "[]")
            job = ev.jobs.get(job_id)
            if task is None:
                problems.append(f"{job_id}: completed with unknown task {event['prediction_id']}")
            elif task_job(task) != job_id or task["params"].get("prompt") != ev.prompts[job_id]:
                problems.append(f"{job_id}: completed with the task of job {task_job(task)}")
            elif task["status"] != "completed" or task["outputs"] != outputs:
                problems.append(f"{job_id}: outputs {outputs} but the task has {task['outputs']}")
            elif job is not None and list(job.outputs) != outputs:
                problems.append(f"{job_id}: record outputs differ from its event")
            else:
                matched += 1
        elif event.get("reason") == "provider_failed":
            failed_by_provider += 1
            if task is None or task["status"] != "failed":
                problems.append(f"{job_id}: failed by the provider, but the task says otherwise")
            elif str(task.get("code") or "") != event.get("task_code", ""):
                problems.append(f"{job_id}: task code {event.get('task_code')} vs {task['code']}")
    counts = (
        f"{matched}/{completed} completed jobs carry their own task's outputs; "
        f"{failed_by_provider} provider failures agree on status and task code"
    )
    return Check(
        "completed outputs equal the simulator's", not problems, counts, tuple(problems[:EXAMPLES])
    )


def submitted_once(ev: Evidence) -> Check:
    wanted = set(ev.ids)
    by_job: dict[str, list[Mapping[str, Any]]] = {}
    for task in ev.tasks:
        by_job.setdefault(task_job(task), []).append(task)
    foreign = sum(len(v) for k, v in by_job.items() if k not in wanted)
    after_ambiguous = after_kill = 0
    unexplained: list[str] = []
    unused = 0
    for job_id in ev.ids:
        tasks = by_job.get(job_id, [])
        event = _final_event(ev, job_id)
        kept = event.get("prediction_id", "") if event else ""
        unused += sum(1 for t in tasks if t["id"] != kept)
        if len(tasks) <= 1:
            continue
        if any(t["faults"].get("ambiguous_submit") for t in tasks[:-1]):
            after_ambiguous += 1
        elif job_id in ev.killed_in_flight:
            after_kill += 1
        else:
            unexplained.append(f"{job_id}: {len(tasks)} tasks, none after an ambiguous submit")
    ambiguous = sum(1 for t in ev.tasks if t["faults"].get("ambiguous_submit"))
    dupes = after_ambiguous + after_kill + len(unexplained)
    counts = (
        f"{len(ev.tasks)} paid tasks for {len(ev.ids)} jobs; {dupes} jobs paid twice "
        f"({after_ambiguous} after an ambiguous submit, {after_kill} after a kill -9 "
        f"mid-submit, {len(unexplained)} otherwise); {ambiguous} ambiguous submits, "
        f"{len(ev.killed_in_flight)} jobs caught mid-submit by kill -9; {unused} paid "
        f"tasks not kept by their job; {foreign} tasks of unknown jobs"
    )
    ok = not unexplained and not foreign
    return Check(
        "no job submitted twice but by ambiguity", ok, counts, tuple(unexplained[:EXAMPLES])
    )


def gauges_back_to_zero(ev: Evidence) -> Check:
    live = {k: v for k, v in ev.stats.items() if k.startswith("now:")}
    leaked = [f"{k}={v}" for k, v in sorted(live.items()) if v != 0]
    counts = "live gauges " + (", ".join(f"{k}={v}" for k, v in sorted(live.items())) or "absent")
    return Check("no in-flight counter leaked", not leaked, counts, tuple(leaked))


def no_slot_leaked(ev: Evidence) -> Check:
    adm = ev.admission
    if adm is None:
        return Check("no slot leaked", True, "n/a: admission control is off")
    counts = (
        f"{adm.slots_used}/{adm.slots_total} provider slots held and {adm.waiting} jobs "
        f"waiting after the run; {adm.rate_limited_total} rate-limit back-offs"
    )
    ok = adm.slots_used == 0 and adm.waiting == 0
    return Check("no slot leaked", ok, counts)


def no_secret_in_logs(ev: Evidence) -> Check:
    hits = [f"{where}: {', '.join(names)}" for where, names in ev.log_leaks.items()]
    counts = f"{len(hits)} log lines with a secret or a job token"
    return Check("no secret in any log", not hits, counts, tuple(hits[:EXAMPLES]))


def check_all(ev: Evidence) -> list[Check]:
    return [
        every_job_terminal(ev),
        one_event_per_job(ev),
        nothing_moved_backwards(ev),
        outputs_match_the_simulator(ev),
        submitted_once(ev),
        gauges_back_to_zero(ev),
        no_slot_leaked(ev),
        no_secret_in_logs(ev),
    ]


def render(checks: Sequence[Check]) -> str:
    """The invariant table: one line per check with its counts, then failing examples."""
    width = max(len(c.name) for c in checks)
    lines = []
    for check in checks:
        verdict = "ok  " if check.ok else "FAIL"
        lines.append(f"  {verdict}  {check.name:<{width}}  {check.counts}")
        lines.extend(f"          - {example}" for example in check.examples)
    return "\n".join(lines)
