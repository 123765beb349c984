"""The receiver app: `POST /webhooks/wavespeed?job=<id>&t=<token>` and `GET /healthz`.

Order of checks on a delivery, each refusing before the next looks at anything:
size (413) -> v3 signature over the raw bytes and the ±300 s window (401) -> the
per-job URL token (401) -> JSON shape (400) -> webhook-id dedupe (200 duplicate)
-> the one atomic transition (200 applied / stale). Redis unreachable -> 503, so
WaveSpeed retries. Nothing stored changes before every check has passed.

Deliveries are the hot path (a provider finishing a wave sends thousands a second), so
`POST /webhooks/wavespeed` is served by `Deliveries`, plain WSGI in front of Flask: a
Flask request (contexts, routing, hooks, jsonify) cost more CPU than verifying and
applying the delivery itself. Flask serves everything else (`/healthz`, `/metrics`,
404s), and its error handlers answer those in the same JSON shape.

Each answer to a delivery is counted by outcome (`worker.telemetry`, best effort), an
applied one's time from request to applied result too
(`kq_webhook_receive_to_applied_seconds`), and `GET /metrics` serves those counts, summed
over all receiver processes, for Prometheus.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any
from urllib.parse import parse_qsl

import redis
import structlog
from flask import Flask, Response
from werkzeug.exceptions import (
    ClientDisconnected,
    HTTPException,
    RequestEntityTooLarge,
    RequestTimeout,
)
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wsgi import ClosingIterator, get_content_length, get_input_stream

from webhook_receiver.body_deadline import BodyDeadline, WSGIApp
from webhook_receiver.signing_secret import SecretSource
from worker import replication, runtime, telemetry
from worker.domain import Prediction, TransitionOutcome
from worker.errors import ProviderError, ValidationError
from worker.histograms import WEBHOOK_RECEIVE_TO_APPLIED, observe_into
from worker.lender import Lender
from worker.metrics import receiver_metrics
from worker.service import Deps, Verifying, apply_webhook
from worker.settings import Settings
from worker.signing import WEBHOOK_PATH, token_matches, verify_v3
from worker.store import JobStore
from worker.wavespeed import WaveSpeedClient

log = structlog.get_logger("kq.receiver")


# The most Redis connections a receiver process applies deliveries on at once: a gevent
# worker serves up to 1,000 clients, and Redis's own thread is the limit long before 16.
REDIS_CONNECTIONS = 16

# The receiver's Redis calls time out after 0.75 s (runtime.FAIL_FAST_TIMEOUT_S): its
# replica wait must end before that.
MAX_REPLICA_WAIT_MS = 500

# An answer: HTTP status and the JSON object of its body.
Answer = tuple[int, dict[str, Any]]


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

    `heartbeat`: keep `kq:heartbeat:receiver:{host}:{pid}` alive for `kq status`; by
    default only when the app builds its own store (a serving process, not a test).
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

    app = Flask("webhook_receiver")
    app.config["MAX_CONTENT_LENGTH"] = settings.webhook_max_bytes

    def answer(status: int, result: str, **extra: Any) -> Response:
        response = Response(_json_bytes({"result": result, **extra}), status)
        response.content_type = "application/json"
        return response

    # Flask's answers (every path but a delivery's) in the deliveries' JSON shape.
    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_: RequestEntityTooLarge) -> Response:
        return answer(413, "too_large", limit_bytes=settings.webhook_max_bytes)

    @app.errorhandler(RequestTimeout)
    def too_slow(exc: RequestTimeout) -> Response:
        return answer(408, "timeout", error=exc.description)

    @app.errorhandler(redis.RedisError)
    def redis_down(exc: redis.RedisError) -> Response:
        log.error("receiver.redis_unavailable", error=type(exc).__name__)
        return answer(503, "unavailable", error="job store unreachable; retry later")

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

    deliveries = Deliveries(
        app.wsgi_app,
        settings=settings,
        store=store,
        provider=provider,
        secrets=secret_source,
        tally=tally,
        clock=clock,
        send_submits=send_submits,
        propagate=lambda: app.testing,
    )
    # A body still arriving this long after its request began is cut off (slow-loris).
    app.wsgi_app = BodyDeadline(deliveries, settings.webhook_body_timeout_s)  # type: ignore[method-assign]
    return app


class Deliveries:
    """WSGI middleware: serves `POST /webhooks/wavespeed` itself, passes the rest on.

    Raises nothing for a delivery: every failure is one of the stated answers, except an
    unexpected exception, which the server answers 500 (or, with `propagate()` true, as
    for a Flask app in testing mode, reaches the caller).
    """

    def __init__(
        self,
        app: WSGIApp,
        *,
        settings: Settings,
        store: JobStore,
        provider: WaveSpeedClient,
        secrets: SecretSource,
        tally: telemetry.Buffered,
        clock: Callable[[], float],
        send_submits: Callable[[list[str]], None] | None,
        propagate: Callable[[], bool],
    ) -> None:
        self._app = app
        self._settings = settings
        self._store = store
        self._secrets = secrets
        self._tally = tally
        self._clock = clock
        self._send_submits = send_submits
        self._propagate = propagate
        # The chain steps the delivery being served in this thread wrote (sent after it).
        self._steps = threading.local()
        self._deps = Deps(
            store=store,
            provider=provider,
            settings=settings,
            clock=clock,
            enqueue_submit=self._remember_step,
        )
        # A delivery is applied on a Redis connection of its own, lent for the delivery:
        # at most REDIS_CONNECTIONS a process, however many clients it serves at once
        # (not with Sentinels: see runtime.pinned_client).
        self._connections: Lender[Deps] | None = None
        if not settings.redis_sentinels:
            pinned = partial(runtime.pinned_copy, self._deps)
            self._connections = Lender(pinned, REDIS_CONNECTIONS)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") != WEBHOOK_PATH:
            return self._app(environ, start_response)
        spawned: list[str] = []
        headers = [("Content-Type", "application/json")]
        if environ.get("REQUEST_METHOD") != "POST":
            status, payload = 405, {"result": "method_not_allowed", "error": "POST only"}
            headers.append(("Allow", "POST"))
        else:
            self._steps.spawned = spawned
            try:
                status, payload = self._answer(environ)
            finally:
                self._steps.spawned = None
        body = _json_bytes(payload)
        headers.append(("Content-Length", str(len(body))))
        start_response(_STATUS_LINES.get(status) or _status_line(status), headers)
        if spawned and self._send_submits is not None:
            # After the answer is written, so a slow broker never delays WaveSpeed's
            # answer; a step that is not sent here is sent by the poller's check of
            # queued jobs.
            send = self._send_submits
            return ClosingIterator([body], lambda: _send_quietly(send, spawned))
        return [body]

    def _lend(self) -> AbstractContextManager[Deps]:
        return nullcontext(self._deps) if self._connections is None else self._connections.lend()

    def _remember_step(self, job_id: str) -> None:
        spawned: list[str] | None = getattr(self._steps, "spawned", None)
        if spawned is not None:
            spawned.append(job_id)

    def _counted(self, status: int, result: str, outcome: str = "", **extra: Any) -> Answer:
        """An answer, counted by outcome for ops (best effort)."""
        self._tally.count(f"webhook.{outcome or result}")
        return status, {"result": result, **extra}

    def _answer(self, environ: dict[str, Any]) -> Answer:
        try:
            return self._deliver(environ)
        except RequestEntityTooLarge:
            # The refused body is never read, so BodyDeadline has the server close the
            # connection with this answer (a kept-alive one would hang up on the next).
            limit = self._settings.webhook_max_bytes
            return self._counted(413, "too_large", limit_bytes=limit)
        except RequestTimeout as exc:
            return self._counted(408, "timeout", error=exc.description)
        except redis.RedisError as exc:
            log.error("receiver.redis_unavailable", error=type(exc).__name__)
            # Not counted: the counter lives in the Redis that is away (another timeout).
            return 503, {"result": "unavailable", "error": "job store unreachable; retry later"}
        except HTTPException as exc:  # e.g. the client hung up mid-body (400)
            return exc.code or 400, {"result": "bad_request", "error": exc.description}
        except Exception:
            if self._propagate():
                raise
            log.exception("receiver.error")
            return 500, {"result": "error", "error": "internal error"}

    def _deliver(self, environ: dict[str, Any]) -> Answer:
        received = time.perf_counter()  # kq_webhook_receive_to_applied_seconds starts here
        settings = self._settings
        limit = settings.webhook_max_bytes
        length = get_content_length(environ)  # None: chunked (or no body)
        if length is None:
            # werkzeug's guarded stream cuts a chunked body at the limit (and does not
            # refuse it): refuse it here.
            body = get_input_stream(environ, max_content_length=limit).read()
            if len(body) >= limit:
                return self._counted(413, "too_large", limit_bytes=limit)
        else:
            if length > limit:
                raise RequestEntityTooLarge()  # refused unread
            # Read at once, never past the stated length.
            body = environ["wsgi.input"].read(length)
            if len(body) < length:
                raise ClientDisconnected()
        webhook_id: str | None = environ.get("HTTP_WEBHOOK_ID")
        job_id, token = _job_and_token(environ.get("QUERY_STRING", ""))
        try:
            secret = self._secrets.get()
        except ProviderError as exc:
            _log(log.error, "receiver.no_secret", job_id, webhook_id, error=str(exc))
            return self._counted(503, "unavailable", error="webhook secret not available yet")
        check = verify_v3(
            secret,
            webhook_id=webhook_id,
            timestamp=environ.get("HTTP_WEBHOOK_TIMESTAMP"),
            signature=environ.get("HTTP_WEBHOOK_SIGNATURE"),
            body=body,
            now=self._clock(),
            tolerance_s=settings.webhook_tolerance_s,
        )
        if not check.ok:
            _log(log.warning, "receiver.bad_signature", job_id, webhook_id, problem=check.problem)
            return self._counted(401, "unauthorized", "bad_signature", error=check.problem)
        if not token_matches(settings.secret_key, job_id, token):
            _log(log.warning, "receiver.bad_token", job_id, webhook_id)
            problem = "missing or invalid job token in URL"
            return self._counted(401, "unauthorized", "bad_token", error=problem)
        try:
            prediction = Prediction.from_json(json.loads(body))
        except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deep
            return self._counted(400, "bad_request", "malformed", error=f"body is not JSON: {exc}")
        except ValidationError as exc:
            return self._counted(
                400,
                "bad_request",
                "malformed",
                error=str(exc),
                fields=[{"field": e.field, "message": e.message} for e in exc.errors],
            )
        assert webhook_id is not None  # verify_v3 refused a delivery without one
        # Dedupe and apply are one atomic step: a delivery counts as seen only once its
        # result is applied (or found stale), so a retry after any failure is applied.
        with self._lend() as deps:
            result = apply_webhook(deps, job_id, prediction, webhook_id)
            if result is None:
                return self._counted(200, "not_final")
            unreplicated = _unless_replicated(deps.store.redis, settings)
        if unreplicated is not None:
            _log(
                log.warning, "receiver.unreplicated", job_id, webhook_id, prediction,
                detail=unreplicated,
            )  # fmt: skip
            return 503, {"result": "unavailable", "error": "not yet on a replica; retry"}
        if isinstance(result, Verifying):
            # A reported failure is confirmed by the provider's GET before it ends the job.
            return self._counted(200, "verifying", state=result.state)
        if result.applied:
            observe_into(self._tally, WEBHOOK_RECEIVE_TO_APPLIED, time.perf_counter() - received)
            return self._counted(200, "applied", state=result.state)
        if result.outcome is TransitionOutcome.DUPLICATE:
            _log(log.info, "receiver.duplicate", job_id, webhook_id, prediction)
            return self._counted(200, "duplicate")
        if result.outcome is TransitionOutcome.MISSING:
            _log(log.warning, "receiver.unknown_job", job_id, webhook_id, prediction)
            return self._counted(200, "unknown_job")
        if result.outcome is TransitionOutcome.MISMATCH:
            _log(log.warning, "receiver.prediction_mismatch", job_id, webhook_id, prediction)
        return self._counted(200, "stale", state=result.state)


def _job_and_token(query: str) -> tuple[str, str | None]:
    """`job` and `t` of a query string (the first of each, as Flask's `request.args`)."""
    if "%" in query or "+" in query or not query.isascii():
        # Escapes to undo: the general parse. WSGI hands the raw query as latin-1; a
        # URL's own bytes are UTF-8.
        raw = query.encode("latin-1", "replace").decode("utf-8", "replace")
        pairs = parse_qsl(raw, keep_blank_values=True, errors="replace")
    else:  # our own URLs (job ids and hex tokens): nothing to decode
        pairs = [(n, v) for n, _, v in (p.partition("=") for p in query.split("&")) if n]
    found: dict[str, str] = {}
    for name, value in pairs:
        found.setdefault(name, value)
    return found.get("job", ""), found.get("t")


def _log(
    method: Callable[..., Any],
    event: str,
    job_id: str,
    webhook_id: str | None,
    prediction: Prediction | None = None,
    **fields: Any,
) -> None:
    """Log a delivery that was not simply applied, with what identifies it (cut short:
    these come from the sender)."""
    if prediction is not None:
        fields.update(prediction_id=prediction.id, status=prediction.status)
    method(event, job_id=job_id[:64] or None, webhook_id=(webhook_id or "")[:64] or None, **fields)


def _json_bytes(payload: dict[str, Any]) -> bytes:
    """The bytes Flask's jsonify writes (sorted keys, compact, a newline), without its
    cost; the few answers of plain `result` and `state` words are made once."""
    common = payload.keys() <= {"result", "state"}
    if common and (cached := _COMMON_BODIES.get(key := tuple(sorted(payload.items())))):
        return cached
    body = (json.dumps(payload, sort_keys=True, separators=(",", ":")) + "\n").encode()
    if common:
        _COMMON_BODIES[key] = body  # bounded: results and job states are fixed words
    return body


_COMMON_BODIES: dict[tuple[tuple[str, Any], ...], bytes] = {}


def _status_line(status: int) -> str:
    return f"{status} {HTTP_STATUS_CODES.get(status, 'UNKNOWN').upper()}"


_STATUS_LINES = {s: _status_line(s) for s in (200, 400, 401, 405, 408, 413, 500, 503)}


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
