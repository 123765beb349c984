"""Prometheus metrics, read from Redis at scrape time (custom collectors).

Why collectors over Redis instead of in-process counters: the receiver runs several
gunicorn workers and the worker several threads in other processes; counting in
Redis (`worker.telemetry`, `kq:stats`) gives one consistent number per deployment,
that survives restarts, whichever process is scraped. Every label is from a small
fixed set (states, outcomes, queue and role names): no job ids, no batch ids.

- `receiver_metrics(client)`: what the receiver's `/metrics` serves (webhook outcomes).
- `StatusCollector`: everything `kq status` shows, for `kq metrics --port P`.
- `ForwardCollector`: outbound webhooks (`kq forward --metrics-port P`): deliveries by
  endpoint and outcome, pending, dead, oldest undelivered age, failing time. The
  `endpoint` label is the subscriber id (a configured, bounded set), never a URL.
- `kq_outputs_*` (in `kq metrics`, once any job's outputs were kept): copy-out pending,
  overdue (not stored KQ_OUTPUTS_ALERT_AFTER_S after completing), oldest pending age,
  jobs stored / failed, retries, bytes; `kq_alarm{name="outputs_not_copied"}` with them.
- Latency histograms (`HISTOGRAMS`), real Prometheus histograms (`_bucket{le}`, `_sum`,
  `_count`) whose counters live in Redis (`kq:latency`), so every process that sees an
  event counts it in the same place and any exporter serves the deployment's total:
  `kq_enqueue_to_result_seconds` and `kq_submit_to_result_seconds` (by terminal
  `state`; counted by lua/transition.lua in the move that ends a job, so exactly once
  per job) and `kq_webhook_receive_to_applied_seconds` (counted by the receiver).
  `kq metrics` serves all three, the receiver's `/metrics` the webhook one.

A collector never raises into the scrape: with Redis away it reports `kq_up 0`.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
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
from worker.alarms import forward_alarms
from worker.histograms import WEBHOOK_RECEIVE_TO_APPLIED, histogram_metrics, read_latency
from worker.snapshot import (
    LIVE_STATES,
    RESOLVERS,
    ROLES,
    TERMINAL,
    AlarmName,
    Forwarding,
    OutputsBacklog,
    StatusConfig,
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
        try:
            latency = read_latency(self.client)
        except redis.RedisError:
            return
        yield from histogram_metrics(latency, (WEBHOOK_RECEIVE_TO_APPLIED,))


def receiver_metrics(client: redis.Redis) -> tuple[bytes, str]:
    """(body, content type) for the receiver's `GET /metrics`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReceiverCollector(client))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class StatusCollector(Collector):
    """Everything in a `worker.status` snapshot, as gauges and counters; with `latency`
    (`read_latency` of the same Redis), the latency histograms too."""

    def __init__(
        self,
        snapshot: Callable[[], StatusSnapshot],
        totals: Callable[[], Counter[str]],
        latency: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.totals = totals
        self.latency = latency

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("kq_up", "1 if Redis answered this scrape")
        try:
            snap = self.snapshot()
            totals = self.totals()
            latency = self.latency() if self.latency is not None else None
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from status_metrics(snap)
        yield from telemetry_metrics(totals, ("webhook.", "submit.", "poll."))
        if latency is not None:
            yield from histogram_metrics(latency)


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
    yield _gauge("kq_poll_due", "Jobs not yet ended due for a poll now", snap.polling.due)
    yield _gauge(
        "kq_poll_scheduled", "Jobs not yet ended on the poll schedule", snap.polling.scheduled
    )
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
        "Enqueue-to-result latency over the recent window, as in `kq status` (for SLOs and "
        "aggregation use the kq_enqueue_to_result_seconds histogram)",
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
    if snap.forward is not None:
        yield from forward_metrics(snap.forward)
    if snap.outputs is not None:
        yield from outputs_metrics(snap.outputs)


def outputs_metrics(backlog: OutputsBacklog) -> Iterator[Metric]:
    """The `kq_outputs_*` families: copy-out of completed jobs' outputs (worker/outputs/)."""
    yield _gauge(
        "kq_outputs_pending",
        "Completed jobs whose outputs are not stored yet (first copy, retry, or copying)",
        backlog.pending,
    )
    yield _gauge(
        "kq_outputs_overdue",
        "Completed jobs whose outputs are still not stored KQ_OUTPUTS_ALERT_AFTER_S after "
        "completing",
        backlog.overdue,
    )
    yield _gauge(
        "kq_outputs_oldest_pending_seconds",
        "Since the oldest job whose outputs are not stored yet completed (0: none)",
        backlog.oldest_s or 0.0,
    )
    copied = CounterMetricFamily(
        "kq_outputs_copied",
        "Jobs whose copy-out settled: stored, or failed for good (with a reason)",
        labels=["state"],
    )
    copied.add_metric(["stored"], backlog.stored)
    copied.add_metric(["failed"], backlog.failed)
    yield copied
    yield CounterMetricFamily(
        "kq_outputs_retries",
        "Copy-out attempts that failed and were retried",
        value=backlog.retries,
    )
    yield CounterMetricFamily(
        "kq_outputs_stored_bytes", "Bytes of output images stored", value=backlog.bytes
    )


class ForwardCollector(Collector):
    """Outbound webhooks (`worker.forward.health.read_forwarding`), and their alarm."""

    def __init__(
        self, forwarding: Callable[[], Forwarding], config: StatusConfig | None = None
    ) -> None:
        self.forwarding = forwarding
        self.config = config or StatusConfig()

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("kq_up", "1 if Redis answered this scrape")
        try:
            forwarding = self.forwarding()
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from forward_metrics(forwarding)
        firing = bool(forward_alarms(forwarding, self.config))
        alarm = GaugeMetricFamily("kq_alarm", "1 while the named alarm fires", labels=["name"])
        alarm.add_metric([AlarmName.FORWARD_FAILING.value], 1 if firing else 0)
        yield alarm


def forward_metrics(fwd: Forwarding) -> Iterator[Metric]:
    """The `kq_forward_*` families; one series per subscriber (label `endpoint`)."""
    deliveries = CounterMetricFamily(
        "kq_forward_deliveries",
        "Outbound webhook delivery attempts by endpoint and outcome "
        "(dead_lettered: deliveries parked after their retry window)",
        labels=["endpoint", "outcome"],
    )
    pending = GaugeMetricFamily(
        "kq_forward_pending", "Deliveries queued or waiting for a retry", labels=["endpoint"]
    )
    dead = GaugeMetricFamily(
        "kq_forward_dead", "Deliveries parked in the endpoint's dead list", labels=["endpoint"]
    )
    oldest = GaugeMetricFamily(
        "kq_forward_oldest_undelivered_seconds",
        "Age of the oldest delivery still owed to the endpoint (0: none)",
        labels=["endpoint"],
    )
    failing = GaugeMetricFamily(
        "kq_forward_failing_seconds",
        "How long every attempt to the endpoint has failed (0: its last attempt succeeded)",
        labels=["endpoint"],
    )
    for e in fwd.endpoints:
        for outcome, count in e.deliveries.items():
            deliveries.add_metric([e.subscriber, outcome], count)
        pending.add_metric([e.subscriber], e.pending)
        dead.add_metric([e.subscriber], e.dead)
        oldest.add_metric([e.subscriber], e.oldest_undelivered_s or 0.0)
        failing.add_metric([e.subscriber], e.failing_for_s or 0.0)
    yield from (deliveries, pending, dead, oldest, failing)
    yield _gauge(
        "kq_forward_unrouted", "Result events not yet queued for the subscribers", fwd.unrouted
    )
    yield _gauge(
        "kq_forward_oldest_unrouted_seconds",
        "Age of the oldest result event not yet queued for the subscribers (0: none)",
        fwd.oldest_unrouted_s or 0.0,
    )
    yield _gauge("kq_forward_processes", "Live `kq forward` processes", fwd.forwarders)


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
