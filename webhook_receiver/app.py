"""The receiver app: `POST /webhooks/wavespeed?job=<id>&t=<token>` and `GET /healthz`.

Order of checks on a delivery, each refusing before the next looks at anything:
size (413) -> v3 signature over the raw bytes and the ±300 s window (401) -> the
per-job URL token (401) -> JSON shape (400) -> webhook-id dedupe (200 duplicate)
-> the one atomic transition (200 applied / stale). Redis unreachable -> 503, so
WaveSpeed retries. Nothing stored changes before every check has passed.

Each answer is counted by outcome (`worker.telemetry`, best effort), an applied one's
time from request to applied result too (`kq_webhook_receive_to_applied_seconds`), and
`GET /metrics` serves those counts, summed over all receiver processes, for Prometheus.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import redis
import structlog
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge, RequestTimeout

from webhook_receiver.body_deadline import BodyDeadline
from webhook_receiver.signing_secret import SecretSource
from worker import replication, runtime, telemetry
from worker.domain import Prediction, TransitionOutcome
from worker.errors import ProviderError, ValidationError
from worker.histograms import WEBHOOK_RECEIVE_TO_APPLIED, observe_into
from worker.metrics import receiver_metrics
from worker.service import Deps, Verifying, apply_webhook
from worker.settings import Settings
from worker.signing import WEBHOOK_PATH, token_matches, verify_v3
from worker.store import JobStore

log = structlog.get_logger("kq.receiver")


# The receiver's Redis calls time out after 0.75 s (runtime.FAIL_FAST_TIMEOUT_S): its
# replica wait must end before that.
MAX_REPLICA_WAIT_MS = 500


def _unless_replicated(client: redis.Redis, settings: Settings) -> str | None:
    """None when the delivery's effect is on KQ_REDIS_WAIT_REPLICAS replicas (or the check
    is off); else why not. Answered 503, the delivery comes again (applied by then, or
    applied again on a promoted replica that lost it: a failover never eats a webhook)."""
    if settings.redis_wait_replicas <= 0:
        return None
    answer = replication.confirm_written(
        client,
        replicas=settings.redis_wait_replicas,
        timeout_ms=min(settings.redis_wait_timeout_ms, MAX_REPLICA_WAIT_MS),
    )
    return None if answer.confirmed else answer.detail


def create_app(
    settings: Settings,
    *,
    store: JobStore | None = None,
    secret_source: SecretSource | None = None,
    clock: Callable[[], float] = time.time,
    heartbeat: bool | None = None,
    send_submits: Callable[[list[str]], None] | None = None,
) -> Flask:
    """Build the receiver on these settings; adapters default to real ones.

    `send_submits`: puts job ids on the submit queue — the chain steps a delivery's move
    wrote, sent once the answer has gone out. By default the Celery queue when the app
    builds its own store; otherwise none, and the poller's check of queued jobs sends them.

    `heartbeat`: keep `kq:heartbeat:receiver:{pid}` alive for `kq status`; by default
    only when the app builds its own store (a serving process, not a test).
    """
    if heartbeat is None:
        heartbeat = store is None
    # Fail fast: a stalled Redis must give WaveSpeed a prompt 503, within its own timeout.
    store = store or runtime.make_store(settings, runtime.make_redis(settings, fail_fast=True))
    # Outcome counts and the apply latency: summed here, written in the background by a
    # serving process (no round trip of a delivery's own), at once otherwise (tests).
    tally = telemetry.Buffered(store.redis)
    if heartbeat:
        runtime.start_heartbeat("receiver", store.redis)
        tally.start()
    provider = runtime.make_provider(settings)
    if secret_source is None:
        secret_source = SecretSource(
            settings.webhook_secret,
            provider.webhook_secret if settings.wavespeed_api_key else None,
        )
    if send_submits is None and heartbeat:
        send_submits = _celery_send(settings)

    def remember_step(job_id: str) -> None:
        g.setdefault("kq_spawned", []).append(job_id)

    deps = Deps(
        store=store, provider=provider, settings=settings, clock=clock, enqueue_submit=remember_step
    )
    secrets = secret_source

    app = Flask("webhook_receiver")
    app.config["MAX_CONTENT_LENGTH"] = settings.webhook_max_bytes
    # A body still arriving this long after its request began is cut off (slow-loris).
    deadline_s = settings.webhook_body_timeout_s
    app.wsgi_app = BodyDeadline(app.wsgi_app, deadline_s)  # type: ignore[method-assign]

    def answer(
        status: int, result: str, *, outcome: str = "", count: bool = True, **extra: Any
    ) -> Response:
        if count and request.path == WEBHOOK_PATH:  # outcome counters, for ops (best effort)
            outcome = outcome or ("malformed" if result == "bad_request" else result)
            tally.count(f"webhook.{outcome}")
        response = jsonify({"result": result, **extra})
        response.status_code = status
        return response

    # The refused body is never read, so BodyDeadline has the server close the
    # connection with this answer (a kept-alive one would hang up on the next request).
    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_: RequestEntityTooLarge) -> Response:
        return answer(413, "too_large", limit_bytes=settings.webhook_max_bytes)

    @app.errorhandler(RequestTimeout)
    def too_slow(exc: RequestTimeout) -> Response:
        return answer(408, "timeout", error=exc.description)

    @app.errorhandler(redis.RedisError)
    def redis_down(exc: redis.RedisError) -> Response:
        log.error("receiver.redis_unavailable", error=type(exc).__name__)
        # Not counted: the counter lives in the Redis that is away (another timeout).
        return answer(503, "unavailable", count=False, error="job store unreachable; retry later")

    @app.post(WEBHOOK_PATH)
    def wavespeed_webhook() -> Response:
        received = time.perf_counter()  # kq_webhook_receive_to_applied_seconds starts here
        body = request.get_data(cache=False)
        if request.content_length is None and len(body) >= settings.webhook_max_bytes:
            # A chunked body is cut at the limit, not refused, by werkzeug: refuse it here.
            return answer(413, "too_large", limit_bytes=settings.webhook_max_bytes)
        webhook_id = request.headers.get("webhook-id")
        job_id = request.args.get("job", "")
        bound = log.bind(job_id=job_id[:64] or None, webhook_id=(webhook_id or "")[:64] or None)
        try:
            secret = secrets.get()
        except ProviderError as exc:
            bound.error("receiver.no_secret", error=str(exc))
            return answer(503, "unavailable", error="webhook secret not available yet")
        check = verify_v3(
            secret,
            webhook_id=webhook_id,
            timestamp=request.headers.get("webhook-timestamp"),
            signature=request.headers.get("webhook-signature"),
            body=body,
            now=clock(),
            tolerance_s=settings.webhook_tolerance_s,
        )
        if not check.ok:
            bound.warning("receiver.bad_signature", problem=check.problem)
            return answer(401, "unauthorized", outcome="bad_signature", error=check.problem)
        if not token_matches(settings.secret_key, job_id, request.args.get("t")):
            bound.warning("receiver.bad_token")
            problem = "missing or invalid job token in URL"
            return answer(401, "unauthorized", outcome="bad_token", error=problem)
        try:
            payload = json.loads(body)
            prediction = Prediction.from_json(payload)
        except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deep
            return answer(400, "bad_request", error=f"body is not JSON: {exc}")
        except ValidationError as exc:
            return answer(
                400,
                "bad_request",
                error=str(exc),
                fields=[{"field": e.field, "message": e.message} for e in exc.errors],
            )
        bound = bound.bind(prediction_id=prediction.id, status=prediction.status)
        assert webhook_id is not None  # verify_v3 refused a delivery without one
        # Dedupe and apply are one atomic step: a delivery counts as seen only once its
        # result is applied (or found stale), so a retry after any failure is applied.
        result = apply_webhook(deps, job_id, prediction, webhook_id)
        if result is None:
            return answer(200, "not_final")
        unreplicated = _unless_replicated(store.redis, settings)
        if unreplicated is not None:
            bound.warning("receiver.unreplicated", detail=unreplicated)
            return answer(503, "unavailable", count=False, error="not yet on a replica; retry")
        if isinstance(result, Verifying):
            # A reported failure is confirmed by the provider's GET before it ends the job.
            return answer(200, "verifying", state=result.state)
        if result.applied:
            observe_into(tally, WEBHOOK_RECEIVE_TO_APPLIED, time.perf_counter() - received)
            return answer(200, "applied", state=result.state)
        if result.outcome is TransitionOutcome.DUPLICATE:
            bound.info("receiver.duplicate")
            return answer(200, "duplicate")
        if result.outcome is TransitionOutcome.MISSING:
            bound.warning("receiver.unknown_job")
            return answer(200, "unknown_job")
        if result.outcome is TransitionOutcome.MISMATCH:
            bound.warning("receiver.prediction_mismatch")
        return answer(200, "stale", state=result.state)

    @app.get("/metrics")
    def metrics() -> Response:
        body, content_type = receiver_metrics(store.redis)
        return Response(body, content_type=content_type)

    @app.get("/healthz")
    def healthz() -> Response:
        try:
            store.ping()
        except redis.RedisError as exc:
            return answer(503, "unhealthy", redis=f"unreachable ({type(exc).__name__})")
        return answer(200, "ok", redis="ok")

    @app.after_request
    def send_spawned_steps(response: Response) -> Response:
        # After the answer is written, so a slow broker never delays WaveSpeed's answer;
        # a step that is not sent here is sent by the poller's check of queued jobs.
        spawned: list[str] | None = g.pop("kq_spawned", None)
        if spawned and send_submits is not None:
            response.call_on_close(lambda: _send_quietly(send_submits, spawned))
        return response

    return app


def _celery_send(settings: Settings) -> Callable[[list[str]], None]:
    from worker.celery_app import configure
    from worker.tasks import enqueue_submits

    configure(settings)
    return enqueue_submits


def _send_quietly(send: Callable[[list[str]], None], job_ids: list[str]) -> None:
    try:
        send(job_ids)
    except Exception as exc:  # any failure: the poller sends what this could not
        log.warning("chain.step_send_deferred", jobs=len(job_ids), error=repr(exc))
