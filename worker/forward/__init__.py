"""Outbound webhooks: `kq forward` delivers result events to subscribers' HTTP endpoints.

Many downstream services cannot read our Redis; this package gives them signed HTTP
POSTs instead (Standard Webhooks: `webhook-id`, `webhook-timestamp`,
`webhook-signature`). The parts, in the order an event meets them:

    subscribers   who gets what: URL, `whsec_` secrets (several during a rotation), a
                  filter (batch id prefix, states); from Redis (`kq subscribers add`) or
                  from a file (KQ_FORWARD_SUBSCRIBERS_FILE)
    outbox        Redis state: the consumer group `kq-forward` on kq:events is read and
                  every event is copied into the queue of each matching subscriber and
                  acked in one MULTI; per subscriber a due-time zset, leases, retries,
                  the dead list, counters and endpoint health (Lua beside it)
    signing       the body (`{"type", "timestamp", "data"}`), the stable webhook-id per
                  (event, subscriber), the signature headers (`standardwebhooks`)
    policy        pure: the retry schedule (exponential, jittered, about a day) and the
                  per-endpoint circuit breaker
    engine        the process: a router thread and one lane per subscriber (its own
                  httpx pool, concurrency limit, timeouts and breaker), so a slow or
                  dead endpoint never delays another
    health        the read side: per endpoint pending, dead, oldest undelivered age,
                  failing since, outcome counters (`kq forward status`, metrics, alarm)

Delivery is at least once and not in order per subscriber: a retried event arrives
after newer ones. Receivers dedupe on `webhook-id`.
"""
