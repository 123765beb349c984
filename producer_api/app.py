"""`kq api`: enqueue and inspect jobs over HTTP with a bearer token (`KQ_API_TOKEN`).

    POST /v1/jobs                 one edit (JSON object)                  201 new / 200 existing
    POST /v1/batches              JSON array or JSONL body, streamed      201
    GET  /v1/jobs/{id}            a job                                   200 / 404
    GET  /v1/batches/{id}         a batch's progress                      200 / 404
    POST /v1/jobs/{id}/cancel     cancel a job                            200 / 404 / 409
    GET  /healthz                 Redis reachable (no token needed)

Errors are JSON: {"error": {"code", "message", "fields": [{"field", "message"}]}}.
A batch is validated whole before anything is enqueued (422 lists the bad lines);
with a `batch_id`, lines get idempotency keys, so a retried POST resumes instead of
duplicating. This app is its own process: never the public webhook endpoint.

OpenAPI description: docs/openapi.yaml.
"""

from __future__ import annotations

import hmac
import json
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import redis
import structlog
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from worker import logs
from worker.batchfile import BatchFile
from worker.domain import check_key, is_job_id
from worker.errors import ValidationError
from worker.producer import Item, Producer
from worker.settings import Settings

log = structlog.get_logger("kq.api")

# One job is a small object; a batch is streamed to disk up to this size.
MAX_JOB_BYTES = 64 * 1024
DEFAULT_MAX_BATCH_BYTES = 64 * 1024 * 1024
MAX_ERRORS_RETURNED = 100
_COPY_CHUNK = 1 << 16


def create_app(
    producer: Producer, *, token: str, max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
) -> Flask:
    """Build the API around a Producer; `token` is the bearer token every call needs."""
    if not token:
        raise ValueError("an API token is required (KQ_API_TOKEN)")
    app = Flask("producer_api")
    expected = f"Bearer {token}".encode()

    def error(
        status: int, code: str, message: str, fields: list[dict[str, str]] | None = None
    ) -> Response:
        body: dict[str, Any] = {"code": code, "message": message}
        if fields is not None:
            body["fields"] = fields
        response = jsonify({"error": body})
        response.status_code = status
        return response

    @app.before_request
    def authenticate() -> Response | None:
        if request.path == "/healthz":
            return None
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            response = error(401, "unauthorized", "missing or wrong bearer token")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        return None

    @app.errorhandler(ValidationError)
    def invalid(exc: ValidationError) -> Response:
        fields = [{"field": e.field, "message": e.message} for e in exc.errors]
        return error(422, "validation_error", str(exc)[:2000], fields[:MAX_ERRORS_RETURNED])

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_: RequestEntityTooLarge) -> Response:
        return error(413, "too_large", "request body is too large")

    @app.errorhandler(redis.RedisError)
    def store_down(exc: redis.RedisError) -> Response:
        log.error("api.redis_unavailable", error=type(exc).__name__)
        return error(503, "unavailable", "job store unreachable; retry later")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return error(
            exc.code or 500, (exc.name or "error").lower().replace(" ", "_"), exc.description or ""
        )

    @app.post("/v1/jobs")
    def create_job() -> Response:
        if (request.content_length or 0) > MAX_JOB_BYTES:
            raise RequestEntityTooLarge()
        data = _json_body(request.get_data(cache=False)[: MAX_JOB_BYTES + 1])
        if not isinstance(data, dict):
            raise ValidationError.single("body", "expected a JSON object")
        batch_id = check_key("batch_id", data.get("batch_id")) or ""
        item = Item.coerce(data)
        job_id = item.job_id
        existed = bool(item.idempotency_key) and producer.get_job(job_id) is not None
        producer.enqueue(item, batch_id=batch_id)
        job = producer.get_job(job_id)
        response = jsonify({"job_id": job_id, "state": job.state.value if job else "queued"})
        response.status_code = 200 if existed else 201
        response.headers["Location"] = f"/v1/jobs/{job_id}"
        return response

    @app.post("/v1/batches")
    def create_batch() -> Response:
        batch_id = check_key("batch_id", request.args.get("batch_id")) or ""
        budget = _budget(request.args.get("budget_usd"))
        if (request.content_length or 0) > max_batch_bytes:
            raise RequestEntityTooLarge()
        with _spooled_body(max_batch_bytes) as path:
            jsonl = _to_jsonl(path)
            with BatchFile(str(jsonl), "jsonl") as batch:
                scan = batch.scan()
                if scan.invalid:
                    fields = [
                        {"field": f"line {e.line}: {fe.field}", "message": fe.message}
                        for e in scan.errors
                        for fe in e.errors
                    ]
                    return error(
                        422,
                        "validation_error",
                        f"{scan.invalid} of {scan.lines} items are invalid; nothing was enqueued",
                        fields[:MAX_ERRORS_RETURNED],
                    )
                if scan.valid == 0:
                    raise ValidationError.single("body", "no edit requests in the body")
                # Keys only when the client names the batch: then a retried POST resumes.
                items: Iterator[Item] = (
                    batch.items(batch_id)
                    if batch_id
                    else (Item(i.request) for i in batch.items("-"))
                )
                receipt = producer.enqueue_batch(
                    items, batch_id=batch_id or None, budget_usd=budget
                )
        response = jsonify({**asdict(receipt), "total": receipt.total})
        response.status_code = 201
        response.headers["Location"] = f"/v1/batches/{receipt.batch_id}"
        return response

    @app.get("/v1/jobs/<job_id>")
    def get_job(job_id: str) -> Response:
        job = producer.get_job(job_id) if is_job_id(job_id) else None
        if job is None:
            return error(404, "not_found", f"no job {job_id[:64]!r} (unknown, or expired)")
        data = asdict(job)
        data["state"] = job.state.value
        data["outputs"] = list(job.outputs)
        return jsonify(data)

    @app.get("/v1/batches/<batch_id>")
    def get_batch(batch_id: str) -> Response:
        progress = producer.batch_progress(batch_id)
        if progress is None:
            return error(404, "not_found", f"no batch {batch_id[:64]!r}")
        return jsonify(progress.as_dict())

    @app.post("/v1/jobs/<job_id>/cancel")
    def cancel(job_id: str) -> Response:
        job = producer.get_job(job_id) if is_job_id(job_id) else None
        if job is None:
            return error(404, "not_found", f"no job {job_id[:64]!r}")
        if not producer.cancel_job(job_id):
            return error(409, "conflict", f"the job is already {job.state.value}")
        return jsonify({"job_id": job_id, "state": "cancelled"})

    @app.get("/healthz")
    def healthz() -> Response:
        producer.store.ping()
        return jsonify({"result": "ok"})

    return app


def _json_body(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ValidationError.single("body", f"not valid JSON ({exc})") from None


def _budget(raw: str | None) -> float | None:
    if raw is None or raw == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise ValidationError.single("budget_usd", "expected an amount in USD") from None


class _spooled_body:
    """Copy the request body to a temp file, refusing more than `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.path: Path | None = None

    def __enter__(self) -> Path:
        with tempfile.NamedTemporaryFile("wb", delete=False, suffix=".kq-api") as out:
            self.path = Path(out.name)
            copied = 0
            while chunk := request.stream.read(_COPY_CHUNK):
                copied += len(chunk)
                if copied > self.limit:
                    raise RequestEntityTooLarge()
                out.write(chunk)
        return self.path

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path.with_suffix(".jsonl").unlink(missing_ok=True)


def _to_jsonl(path: Path) -> Path:
    """A JSON-array body becomes JSONL beside it; a JSONL body is used as it is."""
    with path.open("rb") as fh:
        head = fh.read(_COPY_CHUNK).lstrip()
    if not head.startswith(b"["):
        return path
    with path.open("rb") as fh:
        data = _json_body(fh.read())
    if not isinstance(data, list):
        raise ValidationError.single("body", "expected a JSON array or JSONL")
    out = path.with_suffix(".jsonl")
    with out.open("w", encoding="utf-8") as fh:
        for item in data:
            fh.write(json.dumps(item) + "\n")
    return out


def build(settings: Settings) -> Flask:
    """The app one gunicorn worker serves (built after the fork: its own Redis pool);
    `settings` are the caller's, token (KQ_API_TOKEN) included."""
    from worker.runtime import make_producer  # the Celery side, only in a serving process

    logs.configure_logging(settings.log_format, settings.log_level, secrets=settings.secret_values)
    return create_app(make_producer(settings), token=settings.api_token)
