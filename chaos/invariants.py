"""The promises a chaos run checks, each against the simulator's own ground truth.

Every check returns a `Check`: its name, whether it held, the counts it rests on (always
printed, pass or fail) and a few examples when it did not hold. The evidence is gathered
once, after the run has settled (`Evidence`): the job records and the event stream, the
simulator's tasks with their faults and webhook deliveries (`GET /_sim/tasks`), what the
provider proxy did with every submit's answer, the receiver's answer to every webhook
attempt (the webhook proxy; the simulator keeps only the status code), and when Redis
was away and which jobs a dead worker held.

Longer than our ~400-line guideline on purpose: the invariants are one contract, read
together and in the order they are printed; splitting them would scatter it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from chaos.chains import PushedChain, chain_steps_follow, one_event_per_chain
from chaos.observer import Observations
from chaos.proxy import SubmitRecord, WebhookRecord
from worker.admission import Snapshot
from worker.domain import TERMINAL_STATES, Job

EXAMPLES = 5
_TERMINAL = frozenset(s.value for s in TERMINAL_STATES)
# A job whose terminal state came from its own task's result (not from giving up on it).
_RESULT_REASONS = frozenset({"", "provider_failed", "nsfw"})
# Clocks: every process runs on this machine; this covers rounding and scheduling.
CLOCK_SLACK_S = 0.5
# A submit's answer that reached the worker this close around a Redis outage could not
# be recorded (the worker's Redis calls fail or hang until it is back).
OUTAGE_BEFORE_S = 0.5
OUTAGE_AFTER_S = 2.0


@dataclass(frozen=True)
class Check:
    """One invariant's verdict."""

    name: str
    ok: bool
    counts: str
    examples: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outage:
    """Redis was away (stopped, or frozen by SIGSTOP) from `start` to `end` (wall clock)."""

    kind: str
    start: float
    end: float


@dataclass(frozen=True)
class Timing:
    """The stack's settings that bound how long a lost submit may take to end."""

    settle_s: float = 300.0  # KQ_AMBIGUOUS_SETTLE_S
    deadline_s: float = 3600.0  # KQ_JOB_DEADLINE_S
    poll_max_interval_s: float = 60.0
    sweep_interval_s: float = 2.0
    http_timeout_s: float = 30.0
    webhook_timeout_s: float = 5.0  # the simulator's: how long it waits for an answer

    @property
    def poll_slack_s(self) -> float:
        """How late a poll may see a change: two polls (one to notice, one to act), each
        up to the longest back-off and a sweep apart, and the list calls of the second."""
        return 2 * (self.poll_max_interval_s + self.sweep_interval_s) + self.http_timeout_s


@dataclass
class Evidence:
    """Everything the checks look at, collected after the run."""

    ids: Sequence[str]
    prompts: Mapping[str, str]
    jobs: Mapping[str, Job | None]  # None: expired (or never written)
    seen: Observations
    tasks: Sequence[Mapping[str, Any]]  # GET /_sim/tasks
    killed_in_flight: set[str] = field(default_factory=set)  # `submitting` when -9 landed
    kill_times: Mapping[str, list[float]] = field(default_factory=dict)  # ... and when
    submits: Sequence[SubmitRecord] = ()  # what the provider proxy did with each answer
    webhooks: Sequence[WebhookRecord] = ()  # every webhook attempt and its answer
    outages: Sequence[Outage] = ()
    timing: Timing = field(default_factory=Timing)
    stats: Mapping[str, int] = field(default_factory=dict)
    log_leaks: Mapping[str, list[str]] = field(default_factory=dict)
    admission: Snapshot | None = None  # after the run; None: admission control is off
    expired_ok: bool = False  # soak: records may be gone (TTL); events stand in for them
    chains: Sequence[PushedChain] = ()  # the chains pushed (their step jobs are in `ids`)
    step_written: Mapping[str, bool] = field(default_factory=dict)  # step job id -> written


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


def _tasks_by_job(ev: Evidence) -> dict[str, list[Mapping[str, Any]]]:
    by_job: dict[str, list[Mapping[str, Any]]] = {}
    for task in ev.tasks:
        by_job.setdefault(task_job(task), []).append(task)
    return by_job


def paid_once(ev: Evidence) -> Check:
    """No job has two paid tasks: not after an ambiguous submit, not after a kill -9
    mid-submit, not ever (an ambiguous submit is resent only when proven to have created
    no task)."""
    wanted = set(ev.ids)
    by_job = _tasks_by_job(ev)
    foreign = sum(len(v) for k, v in by_job.items() if k not in wanted)
    twice: list[str] = []
    after_ambiguous = after_kill = unused = 0
    for job_id in ev.ids:
        tasks = by_job.get(job_id, [])
        event = _final_event(ev, job_id)
        kept = event.get("prediction_id", "") if event else ""
        unused += sum(1 for t in tasks if t["id"] != kept)
        if len(tasks) <= 1:
            continue
        if any(t["faults"].get("ambiguous_submit") for t in tasks[:-1]):
            after_ambiguous += 1
            why = "after an ambiguous submit"
        elif job_id in ev.killed_in_flight:
            after_kill += 1
            why = "after a kill -9 mid-submit"
        else:
            why = "otherwise"
        twice.append(f"{job_id}: {len(tasks)} paid tasks ({why}): {[t['id'] for t in tasks]}")
    ambiguous = sum(1 for t in ev.tasks if t["faults"].get("ambiguous_submit"))
    counts = (
        f"{len(ev.tasks)} paid tasks for {len(ev.ids)} jobs; {len(twice)} jobs paid twice "
        f"({after_ambiguous} after an ambiguous submit, {after_kill} after a kill -9 "
        f"mid-submit); {ambiguous} ambiguous submits, {len(ev.killed_in_flight)} jobs caught "
        f"mid-submit by a dead worker; {unused} paid tasks not kept by their job; {foreign} "
        "tasks of unknown jobs"
    )
    ok = not twice and not foreign
    return Check("no job paid twice", ok, counts, tuple(twice[:EXAMPLES]))


def _record(ev: Evidence, job_id: str) -> dict[str, Any] | None:
    """The job's end as stored, or (soak: the record expired) as its event tells it."""
    job = ev.jobs.get(job_id)
    if job is not None:
        return {
            "state": job.state.value,
            "reason": job.reason,
            "prediction_id": job.prediction_id,
            "finished_at": job.finished_at,
            "started_at": job.submitted_at or job.submitting_at or job.created_at,
            "submitting_at": job.submitting_at,
            "candidates_final_at": job.candidates_final_at,
            "candidates": job.candidates,
            "expired": False,
        }
    event = _final_event(ev, job_id)
    if event is None:
        return None
    return {
        "state": event["state"],
        "reason": event.get("reason", ""),
        "prediction_id": event.get("prediction_id", ""),
        "finished_at": float(event.get("finished_at") or 0),
        "started_at": 0.0,
        "submitting_at": 0.0,
        "candidates_final_at": 0.0,
        "candidates": (),
        "expired": True,
    }


def no_duplicate_without_result(ev: Evidence) -> Check:
    """A webhook is answered "duplicate" only when that delivery's result was applied
    (or found stale) before: an earlier attempt of the same webhook id reached the
    receiver, and by the time of the answer the job was terminal with that task."""
    attempts: dict[str, list[WebhookRecord]] = {}
    for record in ev.webhooks:
        attempts.setdefault(record.webhook_id, []).append(record)
    tasks = {str(t["id"]): t for t in ev.tasks}
    answered = sum(1 for r in ev.webhooks if r.status is not None)
    dupes = [r for r in ev.webhooks if r.result == "duplicate"]
    applied = stale = expired = 0
    bad: list[str] = []
    for r in dupes:
        # Another attempt of the same message (a retry, or the second copy of a
        # duplicated one) that reached the receiver before this one was answered.
        earlier = [a for a in attempts[r.webhook_id] if a is not r and a.arrived_at < r.answered_at]
        end = _record(ev, r.job_id)
        where = f"webhook {r.webhook_id[:12]} for job {r.job_id} (task {r.task_id[:12]})"
        if not earlier:
            bad.append(f"{where}: answered duplicate with no other attempt before it")
        elif end is None or end["state"] not in _TERMINAL:
            bad.append(f"{where}: answered duplicate, the job never ended")
        elif end["prediction_id"] != r.task_id:
            bad.append(f"{where}: answered duplicate, the job ended with {end['prediction_id']}")
        elif end["finished_at"] > r.answered_at + CLOCK_SLACK_S:
            late = end["finished_at"] - r.answered_at
            bad.append(f"{where}: answered duplicate {late:.1f} s before the job ended")
        elif end["expired"]:
            expired += 1
        elif end["state"] == _task_outcome(tasks.get(r.task_id)):
            applied += 1
        else:
            stale += 1
    counts = (
        f"{len(ev.webhooks)} webhook attempts seen at the receiver, {answered} answered; "
        f"{len(dupes)} answered duplicate: {applied} after their result was applied, "
        f"{stale} after it was found stale, {expired} records expired; {len(bad)} without"
    )
    return Check(
        "no webhook answered duplicate without its result applied",
        not bad,
        counts,
        tuple(bad[:EXAMPLES]),
    )


def _task_outcome(task: Mapping[str, Any] | None) -> str:
    if task is None:
        return "?"
    return "completed" if task.get("status") == "completed" else "failed"


def _away_s(outages: Sequence[Outage], start: float, end: float) -> float:
    """How long Redis was away (stopped or frozen) between `start` and `end`."""
    return sum(max(0.0, min(end, o.end) - max(start, o.start)) for o in outages)


def ambiguous_failures_in_bound(ev: Evidence) -> Check:
    """Every `submit_ambiguous` failure came when the README says it comes: once every
    candidate task had been finished (simulator ground truth) for the settle time, never
    before, and at most the watchdog and two polls later (the poller looks at a lost
    submit only once its watchdog fired, and may take a poll to see the candidates
    finished and another to act), plus any time Redis was away meanwhile (no poller
    runs then); or at the job deadline, give or take the poll slack."""
    t = ev.timing
    watchdog = t.http_timeout_s + 10.0  # worker.service.submit.SUBMIT_WATCHDOG_MARGIN_S
    late_bound = watchdog + t.settle_s + t.poll_slack_s
    tasks = {str(task["id"]): task for task in ev.tasks}
    by_settle = at_deadline = unreadable = 0
    worst_settle = worst_deadline = worst_noted = 0.0
    bad: list[str] = []
    for job_id in ev.ids:
        end = _record(ev, job_id)
        if end is None or end["reason"] != "submit_ambiguous":
            continue
        if end["expired"]:
            unreadable += 1
            continue
        finished = end["finished_at"]
        ends = [float(tasks[c].get("finished_at") or 0) for c in end["candidates"] if c in tasks]
        settle_ok = False
        after = None
        if end["candidates"] and len(ends) == len(end["candidates"]) and all(ends):
            final = max(ends)  # when the last candidate really finished
            after = finished - final
            since = finished - max(final, end["submitting_at"])
            noted = end["candidates_final_at"]
            # No poller acts while Redis is away: such time is added to the late bound.
            away = _away_s(ev.outages, end["submitting_at"], finished)
            settle_ok = (
                after >= t.settle_s - CLOCK_SLACK_S
                and since <= late_bound + away
                and noted >= final - CLOCK_SLACK_S  # never noted before they finished
            )
        age = finished - end["started_at"]
        deadline_ok = t.deadline_s - CLOCK_SLACK_S <= age <= t.deadline_s + t.poll_slack_s
        if settle_ok:
            by_settle += 1
            worst_settle = max(worst_settle, after or 0.0)
            worst_noted = max(worst_noted, finished - end["candidates_final_at"])
        elif deadline_ok:
            at_deadline += 1
            worst_deadline = max(worst_deadline, age)
        else:
            when = "no finished candidates" if after is None else f"{after:.1f} s"
            bad.append(
                f"{job_id}: failed {when} after its candidates {list(end['candidates'])} "
                f"finished, {age:.1f} s after its submit"
            )
    total = by_settle + at_deadline + unreadable + len(bad)
    counts = (
        f"{total} submit_ambiguous failures: {by_settle} by the settle bound (latest "
        f"{worst_settle:.1f} s after the last candidate finished, {worst_noted:.1f} s after "
        f"the poller saw it; bound {t.settle_s:g}-{late_bound:g} s), {at_deadline} at the "
        f"deadline (latest {worst_deadline:.1f} s after the submit; bound {t.deadline_s:g}-"
        f"{t.deadline_s + t.poll_slack_s:g} s), {unreadable} records expired, {len(bad)} "
        "outside both"
    )
    return Check(
        "every submit_ambiguous failure settled within the documented bound",
        not bad,
        counts,
        tuple(bad[:EXAMPLES]),
    )


def _answer_lost(ev: Evidence, task: Mapping[str, Any], submits: Mapping[str, SubmitRecord]) -> str:
    """Why the submit answer that created `task` never reached its job's record ("" if
    it did reach the worker at a time it could record it)."""
    if task["faults"].get("ambiguous_submit"):
        return "provider hung up"
    record = submits.get(str(task["id"]))
    if record is not None and record.fate != "answered":
        return "held by the proxy" if record.fate == "held" else "worker gone"
    created = float(task.get("submitted_at") or 0)
    watchdog = ev.timing.http_timeout_s + 10.0
    for killed in ev.kill_times.get(task_job(task), []):
        if created - CLOCK_SLACK_S <= killed <= created + watchdog:
            return "worker died"
    delivered = record.answered_at if record is not None else created
    for outage in ev.outages:
        if outage.start - OUTAGE_BEFORE_S <= delivered <= outage.end + OUTAGE_AFTER_S:
            return "Redis away"
    return ""


def _webhook_reached(task: Mapping[str, Any]) -> bool:
    """True if any delivery attempt of any of the task's webhooks was answered 2xx."""
    for delivery in task.get("deliveries") or []:
        for attempt in delivery.get("attempts") or []:
            code = attempt.get("status_code")
            if code is not None and 200 <= int(code) < 300:
                return True
    return False


def paid_without_result_only_when_all_lost(ev: Evidence) -> Check:
    """A job whose task was paid for but that did not end with that task's result (it
    failed `submit_ambiguous`, or otherwise) is one whose submit answer AND every
    webhook delivery were lost (simulator and proxy ground truth): nothing could tell
    the queue that the task was this job's."""
    by_job = _tasks_by_job(ev)
    submits = {r.task_id: r for r in ev.submits if r.task_id}
    reasons: Counter[str] = Counter()
    causes: Counter[str] = Counter()
    lost_both = unpaid_ambiguous = 0
    bad: list[str] = []
    for job_id in ev.ids:
        end = _record(ev, job_id)
        if end is None:
            continue
        own = by_job.get(job_id, [])
        if not own:
            unpaid_ambiguous += end["reason"] == "submit_ambiguous"
            continue
        got_result = end["state"] == "completed" or (
            end["state"] == "failed" and end["reason"] in _RESULT_REASONS
        )
        if got_result and end["prediction_id"] in {t["id"] for t in own}:
            continue
        reasons[end["reason"] or end["state"]] += 1
        for task in own:
            why = _answer_lost(ev, task, submits)
            if not why:
                bad.append(f"{job_id} ({end['reason']}): task {task['id']}'s answer got through")
            elif _webhook_reached(task):
                bad.append(f"{job_id} ({end['reason']}): task {task['id']}'s webhook got through")
            else:
                causes[why] += 1
                continue
            break
        else:
            lost_both += 1
    paid = sum(reasons.values())
    counts = (
        f"{paid} jobs paid without a result ("
        + (", ".join(f"{n} {r}" for r, n in reasons.most_common()) or "none")
        + f"); {lost_both} of them had their submit answer and every webhook lost ("
        + (", ".join(f"{n} {c}" for c, n in causes.most_common()) or "none")
        + f"); {unpaid_ambiguous} submit_ambiguous jobs created no task"
    )
    return Check(
        "paid without a result only when answer and webhooks were lost",
        not bad,
        counts,
        tuple(bad[:EXAMPLES]),
    )


def receiver_prompt_while_frozen(ev: Evidence) -> Check:
    """While Redis was frozen, every webhook got an answer (503) within the provider's
    own timeout, so its retries were not burnt waiting."""
    bound = ev.timing.webhook_timeout_s
    frozen = [o for o in ev.outages if o.kind == "redis frozen"]
    if not frozen:
        return Check("receiver answered promptly while Redis was frozen", True, "n/a: no freeze")
    during = [
        r
        for r in ev.webhooks
        for o in frozen
        if o.start + CLOCK_SLACK_S <= r.arrived_at <= o.end - bound
    ]
    statuses = Counter("none" if r.status is None else str(r.status) for r in during)
    slowest = max((r.answered_at - r.arrived_at for r in during), default=0.0)
    bad = [
        f"webhook {r.webhook_id[:12]} for job {r.job_id}: "
        + ("no answer" if r.status is None else f"{r.status}")
        + f" after {r.answered_at - r.arrived_at:.1f} s"
        for r in during
        if r.status is None or r.answered_at - r.arrived_at > bound
    ]
    counts = (
        f"{len(during)} webhook attempts while frozen, answered "
        + (", ".join(f"{n}x {s}" for s, n in statuses.most_common()) or "none")
        + f"; slowest {slowest:.2f} s (bound: the provider's {bound:g} s timeout)"
    )
    return Check(
        "receiver answered promptly while Redis was frozen", not bad, counts, tuple(bad[:EXAMPLES])
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


def chain_checks(ev: Evidence) -> list[Check]:
    if not ev.chains:
        return []
    found = [
        one_event_per_chain(ev.chains, ev.seen.chain_events),
        chain_steps_follow(
            ev.chains, ev.seen.events, ev.seen.chain_events, ev.tasks, ev.step_written, task_job
        ),
    ]
    return [Check(name, ok, counts, examples) for name, ok, counts, examples in found]


def check_all(ev: Evidence) -> list[Check]:
    return [
        every_job_terminal(ev),
        one_event_per_job(ev),
        nothing_moved_backwards(ev),
        outputs_match_the_simulator(ev),
        paid_once(ev),
        paid_without_result_only_when_all_lost(ev),
        no_duplicate_without_result(ev),
        ambiguous_failures_in_bound(ev),
        receiver_prompt_while_frozen(ev),
        gauges_back_to_zero(ev),
        no_slot_leaked(ev),
        no_secret_in_logs(ev),
        *chain_checks(ev),
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
