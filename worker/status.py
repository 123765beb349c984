"""One read-only snapshot of the whole system, for `kq status`, `kq metrics` and the dashboard.

Everything comes from Redis, so any process (or a laptop with the Redis URL) can
show it and it survives restarts (unlike Flower, which forgets on restart):

    Celery queues         LLEN of the `kq` and `kq.poll` lists, HLEN of `unacked`
    jobs by state         kq:stats (now:<state> gauges, state:<s> terminal totals)
    polling               kq:poll zset: due now / scheduled; overdue = in flight past
                          KQ_JOB_DEADLINE_S (a bounded scan of the zset)
    resolution split      kq:stats resolved_by:<how>, and over the recent window from events
    latency, throughput   the recent part of kq:events (finished_at - created_at)
    retries, 429s,        worker.telemetry minute buckets
    webhook outcomes
    cost                  kq:stats `paid` (jobs that got a provider task) x the price;
                          today from telemetry; per running batch from kq:batch:{id}
    heartbeats            kq:heartbeats, the index of kq:heartbeat:{role}:{pid} keys

`collect` returns a JSON-ready dict (the `kq status --json` format); `render` draws it
with rich. Every read is bounded (capped ranges, no keyspace SCAN), so a large backlog
costs a status call milliseconds. No secrets are read.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Final

import redis
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from worker import keys, telemetry
from worker.admission import Admission
from worker.domain import PRICE_PER_IMAGE_USD
from worker.events import ResultEvent, decode_event, time_to_id
from worker.telemetry import as_int, as_str

# The Celery queue names (worker/celery_app.py), repeated here so a status reader
# never imports Celery; the Redis transport keeps delivered-unacked messages in `unacked`.
CELERY_QUEUES: Final = ("kq", "kq.poll")
CELERY_UNACKED: Final = "unacked"
LIVE_STATES: Final = ("queued", "submitting", "submitted")
TERMINAL: Final = ("completed", "failed", "cancelled")
ROLES: Final = ("worker", "beat", "receiver")


@dataclass(frozen=True)
class StatusConfig:
    """Windows, caps and alarm thresholds (defaults suit a queue of a few thousand jobs/h)."""

    window_s: float = 900.0  # latency, missed-webhook rate, retries: the last 15 minutes
    chart_minutes: int = 30  # throughput/latency series length
    max_events: int = 20_000  # at most this many recent events are read per snapshot
    overdue_scan: int = 10_000  # at most this many in-flight jobs are checked for overdue
    list_limit: int = 20  # overdue / failed jobs listed
    missed_webhook_rate: float = 0.25  # alarm above this share of results arriving by poll
    missed_webhook_min: int = 10  # ... once at least this many results were resolved
    rejected_window_min: int = 5  # alarm on bad signatures/tokens in the last minutes
    rejected_min: int = 3
    batch_scan: int = 200  # at most this many batches looked at for "running batches"


def collect(
    client: redis.Redis,
    *,
    deadline_s: float,
    webhooks_enabled: bool,
    now: float | None = None,
    config: StatusConfig | None = None,
    admission: Admission | None = None,
) -> dict[str, Any]:
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
    *queue_lens, unacked, raw_stats, due, scheduled, dlq = pipe.execute()
    stats = {as_str(k): as_int(v) for k, v in (raw_stats or {}).items()}

    jobs = {s: max(0, stats.get(f"now:{s}", 0)) for s in LIVE_STATES}
    jobs.update({s: stats.get(f"state:{s}", 0) for s in TERMINAL})
    resolved = {k.split(":", 1)[1]: v for k, v in stats.items() if k.startswith("resolved_by:")}
    events = _recent_events(client, ts - max(cfg.window_s, cfg.chart_minutes * 60), cfg)
    window = [e for e in events if e.time >= ts - cfg.window_s]
    recent = telemetry.recent(client, max(1, round(cfg.window_s / 60)), now=ts)
    rejected_recent = telemetry.recent(client, cfg.rejected_window_min, now=ts)
    today = telemetry.today(client, now=ts)
    active: set[str] = set()  # batches with a job in flight or a recent result
    overdue = _overdue(client, ts, deadline_s, cfg, active)
    active.update(e.batch_id for e in events if e.batch_id)
    heartbeats = _heartbeats(client, ts)
    snapshot: dict[str, Any] = {
        "time": ts,
        "queues": {
            **{q: int(n) for q, n in zip(CELERY_QUEUES, queue_lens, strict=True)},
            "reserved": int(unacked),
        },
        "jobs": jobs,
        "in_flight": jobs["submitted"],
        "polling": {"due": int(due), "scheduled": int(scheduled)},
        "overdue": overdue,
        "dlq": int(dlq),
        "failures": _failures(client, cfg.list_limit),
        "resolution": _resolution(resolved, window),
        "recent": _recent(recent, cfg),
        "latency": _latency(window, cfg.window_s),
        "throughput": _series(events, ts, cfg.chart_minutes),
        "cost": _cost(client, stats, today, active, cfg),
        "heartbeats": heartbeats,
        "webhooks_enabled": webhooks_enabled,
        "deadline_s": deadline_s,
        "admission": None if admission is None else asdict(admission.snapshot(ts)),
    }
    snapshot["alarms"] = alarms(snapshot, rejected_recent, cfg)
    return snapshot


def alarms(
    snapshot: dict[str, Any], rejected_recent: Counter[str], cfg: StatusConfig
) -> list[dict[str, str]]:
    """The conditions worth waking someone for, from a snapshot."""
    found: list[dict[str, str]] = []

    def alarm(name: str, severity: str, message: str) -> None:
        found.append({"name": name, "severity": severity, "message": message})

    overdue = snapshot["overdue"]["count"]
    if overdue:
        alarm(
            "overdue_jobs",
            "critical",
            f"{overdue} job(s) in flight past the {snapshot['deadline_s']:.0f} s deadline",
        )
    window = snapshot["resolution"]["window"]
    settled = window["webhook"] + window["poll"]
    rate = window["missed_webhook_rate"]
    if (
        snapshot["webhooks_enabled"]
        and rate is not None
        and settled >= cfg.missed_webhook_min
        and rate > cfg.missed_webhook_rate
    ):
        alarm(
            "missed_webhooks",
            "warning",
            f"{rate:.0%} of the last {settled} results came by polling, not webhook "
            f"(threshold {cfg.missed_webhook_rate:.0%}): is the receiver reachable?",
        )
    rejected = rejected_recent["webhook.bad_signature"] + rejected_recent["webhook.bad_token"]
    if rejected >= cfg.rejected_min:
        alarm(
            "webhook_rejections",
            "critical",
            f"the receiver refused {rejected} webhook(s) (bad signature or token) in the last "
            f"{cfg.rejected_window_min} min: rotated or leaked secret?",
        )
    beats = snapshot["heartbeats"]
    if not beats["worker"]:
        alarm("worker_down", "critical", "no worker heartbeat: nothing submits or polls")
    if not beats["beat"]:
        alarm("beat_down", "critical", "no beat heartbeat: lost webhooks are not polled")
    if snapshot["webhooks_enabled"] and not beats["receiver"]:
        alarm("receiver_down", "warning", "no receiver heartbeat: webhooks may be refused")
    return found


# --- the parts ----------------------------------------------------------------------


def _recent_events(client: redis.Redis, since: float, cfg: StatusConfig) -> list[ResultEvent]:
    """Events written since `since`, newest first, at most `max_events`."""
    entries: Any = client.xrevrange(
        keys.EVENTS, max="+", min=time_to_id(since), count=cfg.max_events
    )
    return [decode_event(i, raw) for i, raw in entries]


def _overdue(
    client: redis.Redis, now: float, deadline_s: float, cfg: StatusConfig, batches: set[str]
) -> dict[str, Any]:
    """In-flight jobs (the poll schedule holds them) whose deadline has passed.

    Adds the batch ids of the in-flight jobs to `batches` on the way.
    """
    members: Any = client.zrange(keys.POLL, 0, cfg.overdue_scan - 1)
    ids = [as_str(m) for m in members]
    found: list[dict[str, Any]] = []
    fields = ("state", "submitted_at", "submitting_at", "created_at", "batch_id")
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        pipe = client.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hmget(keys.job(job_id), fields)
        for job_id, row in zip(chunk, pipe.execute(), strict=True):
            state, submitted, submitting, created, batch = (as_str(v) if v else "" for v in row)
            if state not in ("submitting", "submitted"):
                continue
            if batch:
                batches.add(batch)
            started = _float(submitted) or _float(submitting) or _float(created)
            if started and now - started > deadline_s:
                found.append(
                    {"job_id": job_id, "state": state, "batch_id": batch, "age_s": now - started}
                )
    found.sort(key=lambda j: -j["age_s"])
    return {
        "count": len(found),
        "jobs": found[: cfg.list_limit],
        "scanned": len(ids),
        "truncated": len(ids) >= cfg.overdue_scan,
    }


def _failures(client: redis.Redis, limit: int) -> list[dict[str, Any]]:
    """The most recent failed jobs, from the dead-letter set, with their reasons."""
    raw: Any = client.zrevrange(keys.DLQ, 0, limit - 1, withscores=True)
    if not raw:
        return []
    pipe = client.pipeline(transaction=False)
    for job_id, _ in raw:
        pipe.hmget(keys.job(as_str(job_id)), ("reason", "error", "batch_id", "task_code"))
    out = []
    for (job_id, score), row in zip(raw, pipe.execute(), strict=True):
        reason, error, batch, code = (as_str(v) if v else "" for v in row)
        out.append(
            {
                "job_id": as_str(job_id),
                "time": float(score),
                "reason": reason,
                "error": error[:300],
                "batch_id": batch,
                "task_code": code,
            }
        )
    return out


def _resolution(totals: dict[str, int], window: list[ResultEvent]) -> dict[str, Any]:
    in_window = Counter(e.resolved_by for e in window if e.resolved_by)
    return {
        **{k: totals.get(k, 0) for k in ("webhook", "poll", "worker", "user")},
        "missed_webhook_rate": _rate(totals.get("poll", 0), totals.get("webhook", 0)),
        "window": {
            "webhook": in_window["webhook"],
            "poll": in_window["poll"],
            "missed_webhook_rate": _rate(in_window["poll"], in_window["webhook"]),
        },
    }


def _rate(poll: int, webhook: int) -> float | None:
    return poll / (poll + webhook) if poll + webhook else None


def _recent(recent: Counter[str], cfg: StatusConfig) -> dict[str, Any]:
    return {
        "window_min": max(1, round(cfg.window_s / 60)),
        "submitted": recent["submit.submitted"],
        "submit_retries": recent["submit.retry"],
        "rate_limited_429": recent["submit.rate_limited"],
        "ambiguous": recent["submit.ambiguous"],
        "polls": sum(v for k, v in recent.items() if k.startswith("poll.")),
        "webhooks": {
            k.split(".", 1)[1]: v for k, v in sorted(recent.items()) if k.startswith("webhook.")
        },
    }


def _latency(window: list[ResultEvent], window_s: float) -> dict[str, Any]:
    values = sorted(v for v in (e.latency_s for e in window) if v is not None)
    return {
        "window_s": window_s,
        "count": len(values),
        "p50_s": percentile(values, 0.50),
        "p95_s": percentile(values, 0.95),
    }


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values; None when there are none."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 1))  # ceil(n * q), at least 1
    return sorted_values[int(rank) - 1]


def _series(events: list[ResultEvent], now: float, minutes: int) -> list[dict[str, Any]]:
    """Per minute, oldest first: results by terminal state and the median latency."""
    current = int(now // 60)
    counts: dict[int, Counter[str]] = defaultdict(Counter)
    latencies: dict[int, list[float]] = defaultdict(list)
    for event in events:
        minute = int(event.time // 60)
        counts[minute][event.state] += 1
        if event.latency_s is not None:
            latencies[minute].append(event.latency_s)
    series = []
    for minute in range(current - minutes + 1, current + 1):
        series.append(
            {
                "t": minute * 60,
                **{s: counts[minute][s] for s in TERMINAL},
                "p50_s": percentile(sorted(latencies[minute]), 0.5),
            }
        )
    return series


def _cost(
    client: redis.Redis,
    stats: dict[str, int],
    today: Counter[str],
    active: set[str],
    cfg: StatusConfig,
) -> dict[str, Any]:
    paid = stats.get("paid", 0)
    return {
        "price_usd": PRICE_PER_IMAGE_USD,
        "paid_jobs": paid,
        "total_usd": round(paid * PRICE_PER_IMAGE_USD, 2),
        "today_usd": round(today["submit.submitted"] * PRICE_PER_IMAGE_USD, 2),
        "running_batches": _running_batches(client, active, cfg),
    }


def _running_batches(
    client: redis.Redis, active: set[str], cfg: StatusConfig
) -> list[dict[str, Any]]:
    """Batches with jobs not yet terminal, with their progress and what they cost so far.

    There is no index of batches, and a SCAN of the keyspace costs as much as the number
    of job records; so only batches seen lately (a job in flight, or a result in the
    chart window) are looked at. A batch whose jobs all still sit in the Celery queue
    shows up with its first submit.
    """
    batch_keys = [keys.batch(b) for b in sorted(active)[: cfg.batch_scan]]
    if not batch_keys:
        return []
    pipe = client.pipeline(transaction=False)
    for key in batch_keys:
        pipe.hgetall(key)
    running: list[dict[str, Any]] = []
    for key, raw in zip(batch_keys, pipe.execute(), strict=True):
        counts = {as_str(k): as_int(v) for k, v in (raw or {}).items()}
        total, terminal = counts.get("total", 0), counts.get("terminal", 0)
        if total <= terminal:
            continue
        running.append(
            {
                "batch_id": key.split(":", 2)[2],
                "total": total,
                "terminal": terminal,
                **{s: counts.get(s, 0) for s in TERMINAL},
                "paid": counts.get("paid", 0),
                "cost_usd": round(counts.get("paid", 0) * PRICE_PER_IMAGE_USD, 2),
            }
        )
    running.sort(key=lambda b: str(b["batch_id"]))
    return running[: cfg.list_limit]


def _heartbeats(client: redis.Redis, now: float) -> dict[str, list[dict[str, Any]]]:
    """Live processes by role, from the heartbeat index (key -> expiry; see runtime)."""
    raw: Any = client.zrangebyscore(keys.HEARTBEATS, now, "+inf", withscores=True)
    beats: dict[str, list[dict[str, Any]]] = {role: [] for role in ROLES}
    for key, expires in raw:
        parts = as_str(key).split(":")  # kq:heartbeat:<role>:<pid>
        if len(parts) == 4 and parts[2] in beats:
            beats[parts[2]].append({"pid": as_int(parts[3]), "ttl_s": round(expires - now, 1)})
    for entries in beats.values():
        entries.sort(key=lambda e: int(str(e["pid"])))
    return beats


# --- rendering ------------------------------------------------------------------------


def render(snap: dict[str, Any]) -> RenderableType:
    """The snapshot as rich tables (for `kq status` and `--watch`)."""
    when = datetime.fromtimestamp(snap["time"], UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    head = Text.assemble(("kontext-queue status", "bold"), f"  {when}")

    jobs = snap["jobs"]
    overview = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for name in ("queued", "submitting", "in flight", "completed", "failed", "cancelled"):
        overview.add_column(name, justify="right")
    overview.add_row(
        str(jobs["queued"]),
        str(jobs["submitting"]),
        str(jobs["submitted"]),
        Text(str(jobs["completed"]), style="green"),
        Text(str(jobs["failed"]), style="red" if jobs["failed"] else ""),
        str(jobs["cancelled"]),
    )

    res, lat, recent, cost = snap["resolution"], snap["latency"], snap["recent"], snap["cost"]
    q, p = snap["queues"], snap["polling"]
    facts = Table(show_header=False, box=None, pad_edge=False)
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row(
        "celery queues",
        f"kq {q['kq']}  kq.poll {q['kq.poll']}  reserved by workers {q['reserved']}",
    )
    adm = snap.get("admission")
    if adm:
        backoff = max(0.0, adm["backoff_until"] - snap["time"])
        facts.add_row(
            "provider slots",
            f"{adm['slots_used']}/{adm['slots_total']} in use, {adm['waiting']} waiting; "
            f"submits last minute {adm['submits_last_minute']}/{adm['submits_per_minute_limit']}"
            f" (rate x{adm['rate_factor']:.1f}"
            + (f", paused {backoff:.0f}s after a 429" if backoff else "")
            + f"; 429s so far {adm['rate_limited_total']})",
        )
    facts.add_row(
        "polling",
        f"{p['due']} due now, {p['scheduled']} scheduled; "
        f"{snap['overdue']['count']} overdue; dead letters {snap['dlq']}",
    )
    facts.add_row(
        "resolved by",
        f"webhook {res['webhook']}  poll {res['poll']}  worker {res['worker']}  "
        f"user {res['user']}; missed-webhook rate {_pct(res['missed_webhook_rate'])} "
        f"(last {recent['window_min']} min: {_pct(res['window']['missed_webhook_rate'])})",
    )
    facts.add_row(
        "latency",
        f"p50 {_secs(lat['p50_s'])}  p95 {_secs(lat['p95_s'])}  "
        f"over {lat['count']} results in {recent['window_min']} min",
    )
    webhooks = ", ".join(f"{k} {v}" for k, v in recent["webhooks"].items()) or "none"
    facts.add_row(
        f"last {recent['window_min']} min",
        f"submitted {recent['submitted']}, retries {recent['submit_retries']} "
        f"(429s {recent['rate_limited_429']}), ambiguous {recent['ambiguous']}, "
        f"polls {recent['polls']}; webhooks: {webhooks}",
    )
    batches = "  ".join(
        f"{b['batch_id']} {b['terminal']}/{b['total']} ${b['cost_usd']:.2f}"
        for b in cost["running_batches"]
    )
    facts.add_row(
        "cost",
        f"${cost['total_usd']:.2f} in all ({cost['paid_jobs']} paid tasks), "
        f"${cost['today_usd']:.2f} today" + (f"; running: {batches}" if batches else ""),
    )
    beats = snap["heartbeats"]
    facts.add_row(
        "processes",
        "  ".join(f"{role} {len(beats[role])}" + (" ✓" if beats[role] else " ✗") for role in ROLES),
    )

    parts: list[RenderableType] = [head, overview, Text(""), facts]
    if snap["alarms"]:
        parts.append(Text(""))
        for a in snap["alarms"]:
            style = "bold red" if a["severity"] == "critical" else "bold yellow"
            parts.append(Text.assemble((f"ALARM {a['name']}", style), f": {a['message']}"))
    if snap["overdue"]["jobs"]:
        parts.append(_jobs_table("overdue", snap["overdue"]["jobs"], ("state", "age_s")))
    if snap["failures"]:
        parts.append(_jobs_table("recent failures", snap["failures"][:5], ("reason", "error")))
    return Group(*parts)


def _jobs_table(title: str, rows: list[dict[str, Any]], cols: tuple[str, ...]) -> Table:
    table = Table(title=title, title_justify="left", box=None, header_style="bold")
    table.add_column("job")
    for col in cols:
        table.add_column(col, overflow="fold")
    for row in rows:
        values = [_secs(row[c]) if c.endswith("_s") else str(row[c]) for c in cols]
        table.add_row(row["job_id"], *values)
    return table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _float(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return 0.0
