"""What `kq status` shows, as typed values: one `StatusSnapshot` and its parts.

`worker.status.collect` reads it from Redis; the renderers only read it:
`kq status` (drawn by `kq.ui`), `kq status --json` and the dashboard's `/api/status`
(`StatusSnapshot.to_json`), and the Prometheus exporter (`worker.metrics`).

`to_json` gives the `kq status --json` format: every dataclass becomes an object with
its field names as keys (a field's `metadata["json"]` renames it: the Celery queue
names are not identifiers), tuples become arrays and enums their values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum, StrEnum
from typing import Any, Final

from worker.admission import Snapshot as AdmissionSnapshot
from worker.domain import JobState

# The Celery queue names (worker/celery_app.py), repeated here so a status reader
# never imports Celery; the Redis transport keeps delivered-unacked messages in `unacked`.
SUBMIT_QUEUE: Final = "kq"
POLL_QUEUE: Final = "kq.poll"
CELERY_QUEUES: Final = (SUBMIT_QUEUE, POLL_QUEUE)
CELERY_UNACKED: Final = "unacked"

LIVE_STATES: Final = tuple(s for s in JobState if not s.terminal)
TERMINAL: Final = tuple(s for s in JobState if s.terminal)  # the domain's, in enum order
ROLES: Final = ("worker", "beat", "receiver")
RESOLVERS: Final = ("webhook", "poll", "worker", "user")


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
    forward_failing_s: float = 600.0  # alarm when a `kq forward` endpoint fails this long
    # alarm when completed jobs' outputs are not stored this long (KQ_OUTPUTS_ALERT_AFTER_S)
    outputs_alert_after_s: float = 3 * 3600.0
    outputs_failed_window_s: float = 24 * 3600.0  # ... or a copy was given up this lately


@dataclass(frozen=True)
class CeleryQueues:
    """Messages waiting in each Celery queue, and those delivered but not yet acked."""

    submit: int = field(metadata={"json": SUBMIT_QUEUE})
    poll: int = field(metadata={"json": POLL_QUEUE})
    reserved: int

    def by_name(self) -> dict[str, int]:
        """Queue name -> length, `reserved` last (the JSON object, and metric labels)."""
        return {SUBMIT_QUEUE: self.submit, POLL_QUEUE: self.poll, "reserved": self.reserved}


@dataclass(frozen=True)
class JobCounts:
    """Jobs now in each live state; for the terminal states, all that ever reached it."""

    queued: int = 0
    submitting: int = 0
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0

    def of(self, state: JobState) -> int:
        return int(getattr(self, state.value))

    @property
    def total(self) -> int:
        return sum(self.of(s) for s in JobState)


@dataclass(frozen=True)
class Polling:
    due: int  # jobs not yet terminal on the poll schedule, due now
    scheduled: int  # jobs not yet terminal on the poll schedule, in all
    # Entries kq:poll still holds for terminal (or expired) jobs: never polled, dropped
    # when the poller next reaches them; counted here instead of above.
    finished: int = 0


@dataclass(frozen=True)
class OverdueJob:
    job_id: str
    state: JobState
    batch_id: str
    age_s: float


@dataclass(frozen=True)
class Overdue:
    """In-flight jobs past the deadline, oldest first (at most `list_limit` listed)."""

    count: int
    jobs: tuple[OverdueJob, ...]
    scanned: int
    truncated: bool  # the scan stopped at `overdue_scan` jobs


@dataclass(frozen=True)
class Failure:
    """A job from the dead-letter set, with its reason."""

    job_id: str
    time: float
    reason: str
    error: str
    batch_id: str
    task_code: int | None


@dataclass(frozen=True)
class ResolutionWindow:
    webhook: int
    poll: int
    missed_webhook_rate: float | None


@dataclass(frozen=True)
class Resolution:
    """Terminal jobs by the path that delivered the result: in all, and lately."""

    webhook: int
    poll: int
    worker: int
    user: int
    missed_webhook_rate: float | None
    window: ResolutionWindow

    def of(self, resolver: str) -> int:
        return int(getattr(self, resolver))


@dataclass(frozen=True)
class Recent:
    """Telemetry counts over the last `window_min` minutes."""

    window_min: int
    submitted: int
    submit_retries: int
    rate_limited_429: int
    ambiguous: int
    polls: int
    webhooks: Mapping[str, int]  # outcome -> count, by name


@dataclass(frozen=True)
class Latency:
    """Enqueue-to-result latency over the recent window."""

    window_s: float
    count: int
    p50_s: float | None
    p95_s: float | None


@dataclass(frozen=True)
class Minute:
    """One minute of the throughput chart: results by terminal state, median latency."""

    t: int
    completed: int
    failed: int
    cancelled: int
    p50_s: float | None

    def of(self, state: JobState) -> int:
        return int(getattr(self, state.value))


@dataclass(frozen=True)
class RunningBatch:
    batch_id: str
    total: int
    terminal: int
    completed: int
    failed: int
    cancelled: int
    paid: int
    cost_usd: float


@dataclass(frozen=True)
class Cost:
    price_usd: float
    paid_jobs: int
    total_usd: float
    today_usd: float
    running_batches: tuple[RunningBatch, ...]


@dataclass(frozen=True)
class Heartbeat:
    pid: int
    ttl_s: float
    host: str = ""


@dataclass(frozen=True)
class Heartbeats:
    """Live processes by role."""

    worker: tuple[Heartbeat, ...] = ()
    beat: tuple[Heartbeat, ...] = ()
    receiver: tuple[Heartbeat, ...] = ()

    def of(self, role: str) -> tuple[Heartbeat, ...]:
        beats: tuple[Heartbeat, ...] = getattr(self, role)
        return beats


class AlarmName(StrEnum):
    OVERDUE_JOBS = "overdue_jobs"
    MISSED_WEBHOOKS = "missed_webhooks"
    WEBHOOK_REJECTIONS = "webhook_rejections"
    WORKER_DOWN = "worker_down"
    BEAT_DOWN = "beat_down"
    RECEIVER_DOWN = "receiver_down"
    FORWARD_FAILING = "forward_failing"
    OUTPUTS_NOT_COPIED = "outputs_not_copied"


class Severity(StrEnum):
    CRITICAL = "critical"
    WARNING = "warning"


@dataclass(frozen=True)
class Alarm:
    name: AlarmName
    severity: Severity
    message: str


@dataclass(frozen=True)
class ForwardEndpoint:
    """One `kq forward` subscriber: what it is still owed and how its endpoint fares."""

    subscriber: str
    source: str  # "redis" (`kq subscribers add`), "file", or "" (only its state is left)
    pending: int  # deliveries queued, in flight or waiting for a retry
    dead: int  # deliveries parked in its dead list
    oldest_undelivered_s: float | None  # since the oldest pending one was queued
    failing_for_s: float | None  # since the first failed attempt after the last success
    last_error: str
    deliveries: Mapping[str, int]  # outcome -> delivery attempts (and parkings), in all


@dataclass(frozen=True)
class Forwarding:
    """Outbound webhooks (`kq forward`): per subscriber, and what is not routed yet."""

    endpoints: tuple[ForwardEndpoint, ...]
    unrouted: int  # events of kq:events not yet handed to the subscribers' queues
    oldest_unrouted_s: float | None
    forwarders: int  # live `kq forward` processes (heartbeats)


@dataclass(frozen=True)
class OutputsBacklog:
    """Copy-out of completed jobs' outputs (worker/outputs/): what is not stored yet."""

    pending: int  # jobs whose outputs wait for a first copy, a retry, or are being copied
    overdue: int  # of those, completed more than `alert_after_s` ago (scanned ones)
    oldest_s: float | None  # the oldest pending one: seconds since its job completed
    failed_recent: int  # copies given up for good lately (StatusConfig.outputs_failed_window_s)
    stored: int  # jobs whose outputs were stored, in all
    failed: int  # jobs whose copy was given up, in all
    retries: int  # failed attempts that were retried, in all
    bytes: int  # bytes stored, in all
    alert_after_s: float


@dataclass(frozen=True)
class StatusSnapshot:
    """The whole system at one moment; see `worker.status` for where each part comes from."""

    time: float
    queues: CeleryQueues
    jobs: JobCounts
    in_flight: int
    polling: Polling
    overdue: Overdue
    dlq: int
    failures: tuple[Failure, ...]
    resolution: Resolution
    recent: Recent
    latency: Latency
    throughput: tuple[Minute, ...]
    cost: Cost
    heartbeats: Heartbeats
    webhooks_enabled: bool
    deadline_s: float
    admission: AdmissionSnapshot | None
    alarms: tuple[Alarm, ...] = ()
    # Outbound webhooks; None where the reader was not asked for them.
    forward: Forwarding | None = None
    # Copy-out; None where no job's outputs were ever kept.
    outputs: OutputsBacklog | None = None

    def to_json(self) -> dict[str, Any]:
        """The `kq status --json` object (JSON-ready: dicts, lists, str, numbers, None)."""
        out: dict[str, Any] = _plain(self)
        return out


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {
            f.metadata.get("json", f.name): _plain(getattr(value, f.name)) for f in fields(value)
        }
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value
