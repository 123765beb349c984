"""Read one snapshot of the whole system, for `kq status`, `kq metrics` and the dashboard.

Everything comes from Redis, so any process (or a laptop with the Redis URL) can
show it and it survives restarts (unlike Flower, which forgets on restart):

    Celery queues         LLEN of the `kq` and `kq.poll` lists, HLEN of `unacked`
    jobs by state         kq:stats (now:<state> gauges, state:<s> terminal totals)
    polling               kq:poll zset: due now / scheduled, less the entries of jobs
                          already terminal (a bounded scan of the zset reads each job's
                          state); overdue = in flight past KQ_JOB_DEADLINE_S (same scan)
    resolution split      kq:stats resolved_by:<how>, and over the recent window from events
    latency, throughput   the recent part of kq:events (finished_at - created_at)
    retries, 429s,        worker.telemetry minute buckets
    webhook outcomes
    cost                  kq:stats `paid` (jobs that got a provider task) x the price;
                          today from telemetry; per running batch from kq:batch:{id}
    heartbeats            kq:heartbeats, the index of kq:heartbeat:{role}:{host}:{pid} keys
    outputs (copy-out)    kq:outputs:due (a bounded scan reads each job's finished_at),
                          kq:outputs:failed, kq:outputs:stats (worker/outputs/records.py)

`collect` returns a `worker.snapshot.StatusSnapshot` (its `to_json()` is the
`kq status --json` format; `kq.ui` draws it, `worker.metrics` exports it) with the
alarms of `worker.alarms` attached. Job records are decoded by `worker.store.decode_job`
(only the fields a part needs are read). Every read is bounded (capped ranges, no
keyspace SCAN), so a large backlog costs a status call milliseconds. No secrets are read.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any, Final

import redis

from worker import keys, telemetry
from worker.admission import Admission
from worker.alarms import find_alarms
from worker.batch_views import spent_micros
from worker.domain import PRICE_PER_IMAGE_USD, Job, JobState
from worker.events import JOB, ResultEvent, decode_event, event_type, time_to_id
from worker.forward.health import read_forwarding
from worker.models import MICROS_PER_USD, average_price_micros
from worker.outputs.records import read_backlog
from worker.snapshot import (
    CELERY_QUEUES,
    CELERY_UNACKED,
    LIVE_STATES,
    RESOLVERS,
    ROLES,
    TERMINAL,
    CeleryQueues,
    Cost,
    Failure,
    Heartbeat,
    Heartbeats,
    JobCounts,
    Latency,
    Minute,
    Overdue,
    OverdueJob,
    Polling,
    Recent,
    Resolution,
    ResolutionWindow,
    RunningBatch,
    StatusConfig,
    StatusSnapshot,
)
from worker.store import decode_job
from worker.telemetry import as_int, as_str

IN_FLIGHT: Final = (JobState.SUBMITTING, JobState.SUBMITTED)
# Job records read per pipeline round trip.
CHUNK: Final = 500


def collect(
    client: redis.Redis,
    *,
    deadline_s: float,
    webhooks_enabled: bool,
    now: float | None = None,
    config: StatusConfig | None = None,
    admission: Admission | None = None,
) -> StatusSnapshot:
    """Read a snapshot; raises redis.RedisError when Redis is unreachable."""
    cfg = config or StatusConfig()
    ts = time.time() if now is None else now
    pipe = client.pipeline(transaction=False)
    for queue in CELERY_QUEUES:
        pipe.llen(queue)
    pipe.hlen(CELERY_UNACKED)
    pipe.hgetall(keys.STATS)
    pipe.zcount(keys.POLL, "-inf", ts)
    pipe.zcard(keys.POLL)
    pipe.zcard(keys.DLQ)
    submit_len, poll_len, unacked, raw_stats, due, scheduled, dlq = pipe.execute()
    stats = {as_str(k): as_int(v) for k, v in (raw_stats or {}).items()}

    jobs = JobCounts(
        **{s.value: max(0, stats.get(f"now:{s.value}", 0)) for s in LIVE_STATES},
        **{s.value: stats.get(f"state:{s.value}", 0) for s in TERMINAL},
    )
    resolved = {k.split(":", 1)[1]: v for k, v in stats.items() if k.startswith("resolved_by:")}
    events = _recent_events(client, ts - max(cfg.window_s, cfg.chart_minutes * 60), cfg)
    window = [e for e in events if e.time >= ts - cfg.window_s]
    recent = telemetry.recent(client, max(1, round(cfg.window_s / 60)), now=ts)
    rejected_recent = telemetry.recent(client, cfg.rejected_window_min, now=ts)
    today = telemetry.today(client, now=ts)
    active: set[str] = set()  # batches with a job in flight or a recent result
    finished: list[float] = []  # poll times of schedule entries whose job has ended
    overdue = _overdue(client, ts, deadline_s, cfg, active, finished)
    active.update(e.batch_id for e in events if e.batch_id)
    snapshot = StatusSnapshot(
        time=ts,
        queues=CeleryQueues(submit=int(submit_len), poll=int(poll_len), reserved=int(unacked)),
        jobs=jobs,
        in_flight=jobs.submitted,
        polling=_polling(int(due), int(scheduled), finished, ts),
        overdue=overdue,
        dlq=int(dlq),
        failures=_failures(client, cfg.list_limit),
        resolution=_resolution(resolved, window),
        recent=_recent(recent, cfg),
        latency=_latency(window, cfg.window_s),
        throughput=_series(events, ts, cfg.chart_minutes),
        cost=_cost(client, stats, today, active, cfg),
        heartbeats=_heartbeats(client, ts),
        webhooks_enabled=webhooks_enabled,
        deadline_s=deadline_s,
        admission=None if admission is None else admission.snapshot(ts),
        forward=read_forwarding(client, now=ts),
        outputs=read_backlog(
            client,
            ts,
            alert_after_s=cfg.outputs_alert_after_s,
            failed_window_s=cfg.outputs_failed_window_s,
            scan=cfg.overdue_scan,
        ),
    )
    return replace(snapshot, alarms=find_alarms(snapshot, rejected_recent, cfg))


# --- the parts ----------------------------------------------------------------------


def _recent_events(client: redis.Redis, since: float, cfg: StatusConfig) -> list[ResultEvent]:
    """Events written since `since`, newest first, at most `max_events`."""
    entries: Any = client.xrevrange(
        keys.EVENTS, max="+", min=time_to_id(since), count=cfg.max_events
    )
    return [decode_event(i, raw) for i, raw in entries if event_type(raw) == JOB]


def _jobs(
    client: redis.Redis, job_ids: Sequence[str], fields: Sequence[str]
) -> Iterator[tuple[str, Job | None]]:
    """(id, job) for each id, decoded from only `fields` of its record; None once expired."""
    names = ("state", *fields)
    for start in range(0, len(job_ids), CHUNK):
        chunk = job_ids[start : start + CHUNK]
        pipe = client.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hmget(keys.job(job_id), names)
        for job_id, row in zip(chunk, pipe.execute(), strict=True):
            raw = {n: as_str(v) for n, v in zip(names, row, strict=True) if v is not None}
            yield job_id, decode_job(raw, job_id) if "state" in raw else None


def _overdue(
    client: redis.Redis,
    now: float,
    deadline_s: float,
    cfg: StatusConfig,
    batches: set[str],
    finished: list[float] | None = None,
) -> Overdue:
    """In-flight jobs (the poll schedule holds them) whose deadline has passed.

    Adds the batch ids of the in-flight jobs to `batches` on the way, and to `finished`
    the poll time of each scanned entry whose job is terminal or gone.
    """
    members: Any = client.zrange(keys.POLL, 0, cfg.overdue_scan - 1, withscores=True)
    when = {as_str(m): float(score) for m, score in members}
    ids = list(when)
    found: list[OverdueJob] = []
    fields = ("submitted_at", "submitting_at", "created_at", "batch_id")
    for job_id, job in _jobs(client, ids, fields):
        if (job is None or job.terminal) and finished is not None:
            finished.append(when[job_id])
        if job is None or job.state not in IN_FLIGHT:
            continue
        if job.batch_id:
            batches.add(job.batch_id)
        started = job.submitted_at or job.submitting_at or job.created_at
        if started and now - started > deadline_s:
            found.append(OverdueJob(job_id, job.state, job.batch_id, now - started))
    found.sort(key=lambda j: -j.age_s)
    return Overdue(
        count=len(found),
        jobs=tuple(found[: cfg.list_limit]),
        scanned=len(ids),
        truncated=len(ids) >= cfg.overdue_scan,
    )


def _polling(due: int, scheduled: int, finished: list[float], now: float) -> Polling:
    """The poll schedule's counts without the entries of jobs that have ended.

    A terminal move takes its job off kq:poll, but an entry can come back after it: a
    re-posted batch or job (`create_many` schedules the queued check of every id it is
    given, new or not) or a queued check racing the job's end. The poller drops such an
    entry only when it comes due (up to a minute later); until then it is `finished`, not
    `scheduled`. Past the scan cap (`overdue_scan` entries, the earliest first) the
    unscanned rest counts as scheduled.
    """
    finished_due = sum(1 for at in finished if at <= now)
    return Polling(
        due=max(0, due - finished_due),
        scheduled=max(0, scheduled - len(finished)),
        finished=len(finished),
    )


def _failures(client: redis.Redis, limit: int) -> tuple[Failure, ...]:
    """The most recent failed jobs, from the dead-letter set, with their reasons."""
    raw: Any = client.zrevrange(keys.DLQ, 0, limit - 1, withscores=True)
    if not raw:
        return ()
    when = {as_str(job_id): float(score) for job_id, score in raw}
    fields = ("reason", "error", "batch_id", "task_code")
    return tuple(
        Failure(
            job_id=job_id,
            time=when[job_id],
            reason=job.reason if job else "",
            error=job.error[:300] if job else "",
            batch_id=job.batch_id if job else "",
            task_code=job.task_code if job else None,
        )
        for job_id, job in _jobs(client, list(when), fields)
    )


def _resolution(totals: dict[str, int], window: list[ResultEvent]) -> Resolution:
    in_window = Counter(e.resolved_by for e in window if e.resolved_by)
    by = {k: totals.get(k, 0) for k in RESOLVERS}
    return Resolution(
        webhook=by["webhook"],
        poll=by["poll"],
        worker=by["worker"],
        user=by["user"],
        missed_webhook_rate=_rate(by["poll"], by["webhook"]),
        window=ResolutionWindow(
            webhook=in_window["webhook"],
            poll=in_window["poll"],
            missed_webhook_rate=_rate(in_window["poll"], in_window["webhook"]),
        ),
    )


def _rate(poll: int, webhook: int) -> float | None:
    return poll / (poll + webhook) if poll + webhook else None


def _recent(recent: Counter[str], cfg: StatusConfig) -> Recent:
    return Recent(
        window_min=max(1, round(cfg.window_s / 60)),
        submitted=recent["submit.submitted"],
        submit_retries=recent["submit.retry"],
        rate_limited_429=recent["submit.rate_limited"],
        ambiguous=recent["submit.ambiguous"],
        polls=sum(v for k, v in recent.items() if k.startswith("poll.")),
        webhooks={
            k.split(".", 1)[1]: v for k, v in sorted(recent.items()) if k.startswith("webhook.")
        },
    )


def _latency(window: list[ResultEvent], window_s: float) -> Latency:
    values = sorted(v for v in (e.latency_s for e in window) if v is not None)
    return Latency(
        window_s=window_s,
        count=len(values),
        p50_s=percentile(values, 0.50),
        p95_s=percentile(values, 0.95),
    )


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values; None when there are none."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 1))  # ceil(n * q), at least 1
    return sorted_values[int(rank) - 1]


def _series(events: list[ResultEvent], now: float, minutes: int) -> tuple[Minute, ...]:
    """Per minute, oldest first: results by terminal state and the median latency."""
    current = int(now // 60)
    counts: dict[int, Counter[str]] = defaultdict(Counter)
    latencies: dict[int, list[float]] = defaultdict(list)
    for event in events:
        minute = int(event.time // 60)
        counts[minute][event.state] += 1
        if event.latency_s is not None:
            latencies[minute].append(event.latency_s)
    return tuple(
        Minute(
            t=minute * 60,
            **{s.value: counts[minute][s.value] for s in TERMINAL},
            p50_s=percentile(sorted(latencies[minute]), 0.5),
        )
        for minute in range(current - minutes + 1, current + 1)
    )


def _cost(
    client: redis.Redis,
    stats: dict[str, int],
    today: Counter[str],
    active: set[str],
    cfg: StatusConfig,
) -> Cost:
    paid = stats.get("paid", 0)
    # Each task at its own model's price: transition.lua adds it to `paid_micros` when it
    # counts the task as paid. Counters from before that fall back to the mean price of
    # the submits counted with their price.
    totals = telemetry.totals(client)
    mean = average_price_micros(totals["submit.submitted"], totals[telemetry.COST_SUBMITTED_MICROS])
    spent = spent_micros(stats, mean)
    today_micros = today[telemetry.COST_SUBMITTED_MICROS] or round(
        today["submit.submitted"] * PRICE_PER_IMAGE_USD * MICROS_PER_USD
    )
    return Cost(
        price_usd=PRICE_PER_IMAGE_USD,
        paid_jobs=paid,
        total_usd=round(spent / MICROS_PER_USD, 2),
        today_usd=round(today_micros / MICROS_PER_USD, 2),
        running_batches=_running_batches(client, active, cfg),
    )


def _running_batches(
    client: redis.Redis, active: set[str], cfg: StatusConfig
) -> tuple[RunningBatch, ...]:
    """Batches with jobs not yet terminal, with their progress and what they cost so far.

    There is no index of batches, and a SCAN of the keyspace costs as much as the number
    of job records; so only batches seen lately (a job in flight, or a result in the
    chart window) are looked at. A batch whose jobs all still sit in the Celery queue
    shows up with its first submit.
    """
    batch_ids = sorted(active)[: cfg.batch_scan]
    if not batch_ids:
        return ()
    pipe = client.pipeline(transaction=False)
    for batch_id in batch_ids:
        pipe.hgetall(keys.batch(batch_id))
    running: list[RunningBatch] = []
    for batch_id, raw in zip(batch_ids, pipe.execute(), strict=True):
        counts = {as_str(k): as_int(v) for k, v in (raw or {}).items()}
        total, terminal = counts.get("total", 0), counts.get("terminal", 0)
        if total <= terminal:
            continue
        running.append(
            RunningBatch(
                batch_id=batch_id,
                total=total,
                terminal=terminal,
                **{s.value: counts.get(s.value, 0) for s in TERMINAL},
                paid=counts.get("paid", 0),
                cost_usd=round(
                    spent_micros(
                        counts, average_price_micros(total, counts.get("estimate_micros", 0))
                    )
                    / MICROS_PER_USD,
                    2,
                ),
            )
        )
    return tuple(running[: cfg.list_limit])  # in batch id order already


def _heartbeats(client: redis.Redis, now: float) -> Heartbeats:
    """Live processes by role, from the heartbeat index (key -> expiry; see runtime)."""
    raw: Any = client.zrangebyscore(keys.HEARTBEATS, now, "+inf", withscores=True)
    beats: dict[str, list[Heartbeat]] = {role: [] for role in ROLES}
    for key, expires in raw:
        name = as_str(key)
        if not name.startswith(keys.HEARTBEAT_PREFIX):
            continue
        role, _, where = name[len(keys.HEARTBEAT_PREFIX) :].partition(":")  # <role>:<host>:<pid>
        host, _, pid = where.rpartition(":")
        if role in beats and pid.isdigit():
            beat = Heartbeat(pid=int(pid), ttl_s=round(expires - now, 1), host=host)
            beats[role].append(beat)
    return Heartbeats(
        **{role: tuple(sorted(b, key=lambda e: (e.host, e.pid))) for role, b in beats.items()}
    )
