"""Prometheus metrics, read from Redis at scrape time (custom collectors).

Why collectors over Redis instead of in-process counters: the receiver runs several
gunicorn workers and the worker several threads in other processes; counting in
Redis (`worker.telemetry`, `kq:stats`) gives one consistent number per deployment,
that survives restarts, whichever process is scraped. Every label is from a small
fixed set (states, outcomes, queue and role names): no job ids, no batch ids.

- `receiver_metrics(client)`: what the receiver's `/metrics` serves (webhook outcomes).
- `StatusCollector`: everything `kq status` shows, for `kq metrics --port P`.

A collector never raises into the scrape: with Redis away it reports `kq_up 0`.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Final

import redis
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from worker import telemetry
from worker.snapshot import (
    LIVE_STATES,
    RESOLVERS,
    ROLES,
    TERMINAL,
    AlarmName,
    StatusSnapshot,
)

_TELEMETRY_FAMILIES: Final = (
    # (name prefix in telemetry, metric name, label, help, vocabulary)
    (
        "webhook.",
        "kq_webhook_requests",
        "outcome",
        "Webhook deliveries handled by the receiver, by outcome",
        telemetry.WEBHOOK_OUTCOMES,
    ),
    (
        "submit.",
        "kq_submit",
        "outcome",
        "Submit attempts to WaveSpeed, by outcome (rate_limited is also a retry)",
        telemetry.SUBMIT_OUTCOMES,
    ),
    (
        "poll.",
        "kq_poll",
        "outcome",
        "Jobs looked at by the polling sweep, by outcome",
        telemetry.POLL_OUTCOMES,
    ),
)


def telemetry_metrics(totals: Counter[str], prefixes: tuple[str, ...]) -> list[Metric]:
    """Counter families from telemetry totals; every known outcome appears (0 if unseen)."""
    families: list[Metric] = []
    for prefix, name, label, doc, vocabulary in _TELEMETRY_FAMILIES:
        if prefix not in prefixes:
            continue
        family = CounterMetricFamily(name, doc, labels=[label])
        for outcome in vocabulary:
            family.add_metric([outcome], totals[prefix + outcome])
        families.append(family)
    return families


class ReceiverCollector(Collector):
    """Webhook outcome counters (all receiver processes together) and Redis reachability."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("kq_up", "1 if Redis answered this scrape")
        try:
            totals = telemetry.totals(self.client)
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from telemetry_metrics(totals, ("webhook.",))


def receiver_metrics(client: redis.Redis) -> tuple[bytes, str]:
    """(body, content type) for the receiver's `GET /metrics`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReceiverCollector(client))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class StatusCollector(Collector):
    """Everything in a `worker.status` snapshot, as gauges and counters."""

    def __init__(
        self, snapshot: Callable[[], StatusSnapshot], totals: Callable[[], Counter[str]]
    ) -> None:
        self.snapshot = snapshot
        self.totals = totals

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("kq_up", "1 if Redis answered this scrape")
        try:
            snap = self.snapshot()
            totals = self.totals()
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from status_metrics(snap)
        yield from telemetry_metrics(totals, ("webhook.", "submit.", "poll."))


def status_metrics(snap: StatusSnapshot) -> Iterator[Metric]:
    """The metric families for one status snapshot."""
    jobs = GaugeMetricFamily("kq_jobs", "Jobs currently in each live state", labels=["state"])
    for state in LIVE_STATES:
        jobs.add_metric([state.value], snap.jobs.of(state))
    yield jobs
    yield CounterMetricFamily(
        "kq_jobs_enqueued", "Jobs enqueued (live + terminal)", value=snap.jobs.total
    )
    ended = CounterMetricFamily(
        "kq_jobs_terminal", "Jobs that reached each terminal state", labels=["state"]
    )
    for state in TERMINAL:
        ended.add_metric([state.value], snap.jobs.of(state))
    yield ended
    resolved = CounterMetricFamily(
        "kq_jobs_resolved", "Terminal jobs by the path that delivered the result", labels=["by"]
    )
    for by in RESOLVERS:
        resolved.add_metric([by], snap.resolution.of(by))
    yield resolved
    queues = GaugeMetricFamily(
        "kq_celery_queue_length",
        "Messages waiting in each Celery queue (reserved: delivered, not yet acked)",
        labels=["queue"],
    )
    for queue, length in snap.queues.by_name().items():
        queues.add_metric([queue], length)
    yield queues
    yield _gauge("kq_poll_due", "In-flight jobs due for a poll now", snap.polling.due)
    yield _gauge("kq_poll_scheduled", "In-flight jobs on the poll schedule", snap.polling.scheduled)
    yield _gauge("kq_jobs_overdue", "In-flight jobs past KQ_JOB_DEADLINE_S", snap.overdue.count)
    yield _gauge("kq_dead_letters", "Failed jobs in the dead-letter set", snap.dlq)
    window = snap.resolution.window.missed_webhook_rate
    yield _gauge(
        "kq_missed_webhook_ratio",
        "Share of recent results that came by polling instead of webhook",
        0.0 if window is None else window,
    )
    latency = GaugeMetricFamily(
        "kq_latency_seconds",
        "Enqueue-to-result latency over the recent window",
        labels=["quantile"],
    )
    for quantile, value in (("0.5", snap.latency.p50_s), ("0.95", snap.latency.p95_s)):
        latency.add_metric([quantile], float("nan") if value is None else value)
    yield latency
    cost = snap.cost
    yield CounterMetricFamily(
        "kq_paid_tasks", "Jobs that got a (billed) provider task", value=cost.paid_jobs
    )
    yield CounterMetricFamily(
        "kq_cost_usd", "Estimated spend at the per-image price", value=cost.total_usd
    )
    yield _gauge("kq_cost_today_usd", "Estimated spend today (UTC)", cost.today_usd)
    adm = snap.admission
    if adm:
        yield _gauge("kq_provider_slots_used", "Provider slots held (admission)", adm.slots_used)
        yield _gauge("kq_provider_slots_total", "KQ_MAX_IN_FLIGHT", adm.slots_total)
        yield _gauge("kq_admission_waiting", "Jobs waiting for a provider slot", adm.waiting)
        yield _gauge(
            "kq_submits_last_minute", "Submits in the last minute", adm.submits_last_minute
        )
        yield _gauge("kq_submit_rate_factor", "Share of the rate limit in use", adm.rate_factor)
    beats = GaugeMetricFamily(
        "kq_process_heartbeats", "Live processes by role (heartbeat keys)", labels=["role"]
    )
    for role in ROLES:
        beats.add_metric([role], len(snap.heartbeats.of(role)))
    yield beats
    firing = {a.name for a in snap.alarms}
    alarm = GaugeMetricFamily("kq_alarm", "1 while the named alarm fires", labels=["name"])
    for name in AlarmName:
        alarm.add_metric([name.value], 1 if name in firing else 0)
    yield alarm


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def serve_exporter(
    collector: Collector, *, port: int, host: str = "127.0.0.1"
) -> tuple[Any, threading.Thread]:
    """Serve `collector` on http://host:port/metrics in a background thread."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, thread = start_http_server(port, addr=host, registry=registry)
    return server, thread
