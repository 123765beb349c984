"""The receiver's Buffered telemetry sink: summed in memory, written in one round trip."""

from __future__ import annotations

import redis

from worker import telemetry
from worker.histograms import WEBHOOK_RECEIVE_TO_APPLIED, observe_into, read_latency


def test_unstarted_sink_writes_at_once(redis_client: redis.Redis) -> None:
    """Before start() (a test, a short-lived process) every call is written straight away."""
    sink = telemetry.Buffered(redis_client)
    sink.count("webhook.applied")
    sink.count("job.not-a-counter")  # outside the vocabulary: dropped, as by count()
    observe_into(sink, WEBHOOK_RECEIVE_TO_APPLIED, 0.003)
    assert telemetry.totals(redis_client) == {"webhook.applied": 1}
    raw = read_latency(redis_client)
    assert raw["webhook||3"] == "1"  # 0.003 s: the third bound (0.005)
    assert float(raw["webhook||sum"]) == 0.003


def test_started_sink_sums_and_writes_on_close(redis_client: redis.Redis) -> None:
    """After start() counts are summed in memory; close() writes what is left, once."""
    sink = telemetry.Buffered(redis_client, every_s=3600).start()  # no timed flush here
    for _ in range(5):
        sink.count("webhook.applied")
        observe_into(sink, WEBHOOK_RECEIVE_TO_APPLIED, 0.02)
    sink.count("webhook.duplicate", 2)
    assert telemetry.totals(redis_client) == {}  # nothing written yet
    sink.close()
    assert telemetry.totals(redis_client) == {"webhook.applied": 5, "webhook.duplicate": 2}
    raw = read_latency(redis_client)
    assert raw["webhook||5"] == "5"  # 0.02 s: the fifth bound (0.025)
    assert abs(float(raw["webhook||sum"]) - 0.1) < 1e-9
    sink.close()  # idempotent: nothing is written twice
    assert telemetry.totals(redis_client)["webhook.applied"] == 5


def test_sink_never_raises_with_redis_down() -> None:
    down = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    sink = telemetry.Buffered(down)
    sink.count("webhook.applied")  # must not raise
    observe_into(sink, WEBHOOK_RECEIVE_TO_APPLIED, 0.01)
