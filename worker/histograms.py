"""Latency histograms kept in Redis (`kq:latency`), so every process that sees an end of
the span can count it and any exporter can serve the deployment-wide histogram:
enqueue->result and submit->result (counted by lua/transition.lua as a job ends) and
webhook receive->applied (counted by the receiver)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import redis
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from worker import keys, telemetry
from worker.snapshot import TERMINAL

# Bucket upper bounds in seconds. A job's latency spans a provider inference (seconds), the
# poll fallback (minutes) and, for enqueue->result, hours in the queue behind a big batch.
# lua/transition.lua repeats this list (it buckets in the job's terminal move).
JOB_LATENCY_BUCKETS_S: Final = (
    1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0,
    1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
)  # fmt: skip
# Applying a webhook is a few Redis round trips: milliseconds, unless Redis struggles.
WEBHOOK_APPLY_BUCKETS_S: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


@dataclass(frozen=True)
class HistogramSpec:
    """One histogram kept in the `kq:latency` hash.

    Fields: `<span>|<label value>|<n>` counts observations in bucket n (1-based: the
    first bound >= the value; len(bounds) + 1 for those above the last bound, i.e. only
    in +Inf), `<span>|<label value>|sum` adds up the observed seconds. Buckets are not
    cumulative in Redis (one HINCRBY per observation); the exporter adds them up.
    """

    span: str
    metric: str
    doc: str
    bounds: tuple[float, ...]
    label: str = ""  # the label's name; "" for an unlabelled histogram
    values: tuple[str, ...] = ("",)  # every label value, exported even before its first count


_TERMINAL_STATES: Final = tuple(s.value for s in TERMINAL)
ENQUEUE_TO_RESULT: Final = HistogramSpec(
    "enqueue",
    "kq_enqueue_to_result_seconds",
    "Seconds from enqueue (the job record written) to its result (terminal state), per job",
    JOB_LATENCY_BUCKETS_S,
    "state",
    _TERMINAL_STATES,
)
SUBMIT_TO_RESULT: Final = HistogramSpec(
    "submit",
    "kq_submit_to_result_seconds",
    "Seconds from the provider accepting the task to the job's result, per job that got one",
    JOB_LATENCY_BUCKETS_S,
    "state",
    _TERMINAL_STATES,
)
WEBHOOK_RECEIVE_TO_APPLIED: Final = HistogramSpec(
    "webhook",
    "kq_webhook_receive_to_applied_seconds",
    "Seconds from the receiver taking a webhook request to its result being applied",
    WEBHOOK_APPLY_BUCKETS_S,
)
HISTOGRAMS: Final = (ENQUEUE_TO_RESULT, SUBMIT_TO_RESULT, WEBHOOK_RECEIVE_TO_APPLIED)
# How prometheus_client's own Histogram writes `le` ("1.0", "0.0025", "+Inf"); typed here.
_le: Final[Callable[[float], str]] = floatToGoString


def bucket_slot(bounds: tuple[float, ...], value: float) -> int:
    """The 1-based bucket an observation is counted in (len(bounds) + 1: above them all)."""
    for n, bound in enumerate(bounds, start=1):
        if value <= bound:
            return n
    return len(bounds) + 1


def observe(client: redis.Redis, spec: HistogramSpec, seconds: float, label: str = "") -> None:
    """Count one observation (best effort: a Redis error loses it, never fails the caller)."""
    value = max(0.0, seconds)
    field = f"{spec.span}|{label}|"
    try:
        pipe = client.pipeline(transaction=True)  # the bucket and the sum together
        pipe.hincrby(keys.LATENCY, field + str(bucket_slot(spec.bounds, value)), 1)
        pipe.hincrbyfloat(keys.LATENCY, field + "sum", value)
        pipe.execute()
    except redis.RedisError:
        pass


def observe_into(
    sink: telemetry.Buffered, spec: HistogramSpec, seconds: float, label: str = ""
) -> None:
    """`observe`, summed in a Buffered sink and written with its next round trip."""
    value = max(0.0, seconds)
    field = f"{spec.span}|{label}|"
    sink.add(keys.LATENCY, field + str(bucket_slot(spec.bounds, value)), n=1)
    sink.add(keys.LATENCY, field + "sum", seconds=value)


def read_latency(client: redis.Redis) -> dict[str, str]:
    """The raw `kq:latency` counters (a bounded hash: about 150 fields)."""
    raw: Any = client.hgetall(keys.LATENCY)
    return {telemetry.as_str(k): telemetry.as_str(v) for k, v in (raw or {}).items()}


def histogram_metrics(
    raw: Mapping[str, str], specs: tuple[HistogramSpec, ...] = HISTOGRAMS
) -> Iterator[Metric]:
    """Histogram families (cumulative `le` buckets, `_sum`, `_count`) from `read_latency`."""
    for spec in specs:
        family = HistogramMetricFamily(
            spec.metric, spec.doc, labels=[spec.label] if spec.label else None
        )
        for value in spec.values:
            field = f"{spec.span}|{value}|"
            buckets: list[tuple[str, float]] = []
            total = 0
            for n, bound in enumerate((*spec.bounds, float("inf")), start=1):
                total += _count(raw.get(field + str(n)))
                buckets.append((_le(bound), total))
            family.add_metric(
                [value] if spec.label else [], buckets, sum_value=_seconds(raw.get(field + "sum"))
            )
        yield family


def _count(value: str | None) -> int:
    try:
        return max(0, int(value or 0))
    except ValueError:
        return 0


def _seconds(value: str | None) -> float:
    try:
        return float(value or 0)
    except ValueError:
        return 0.0
