"""`kq api`: enqueue and inspect jobs over HTTP with a bearer token (`KQ_API_TOKEN`).

    POST /v1/jobs                 one edit (JSON object)                  201 new / 200 existing
    POST /v1/batches              JSON array or JSONL body, streamed      201 new / 200 existing
    GET  /v1/jobs/{id}            a job                                   200 / 404
    GET  /v1/batches/{id}         a batch's progress                      200 / 404
    GET  /v1/batches/{id}/jobs    a batch's jobs, paged, by state         200 / 404
    POST /v1/jobs/{id}/cancel     cancel a job                            200 / 404 / 409
    POST /v1/chains               a chain of edits (JSON object)          201 new / 200 existing
    GET  /v1/chains/{id}          a chain, its branches and step jobs     200 / 404
    POST /v1/chains/{id}/cancel   cancel a chain                          200 / 404 / 409
    GET  /healthz                 Redis reachable (no token needed)

Errors are JSON: {"error": {"code", "message", "fields": [{"field", "message"}]}}, also
those werkzeug answers before a view runs (404, 405 with `Allow`, 413) and, served by
`kq api`, those gunicorn answers itself (414, 431, 400: see worker.wsgi_server).
A batch is validated whole before anything is enqueued (422 lists the bad lines);
with a `batch_id`, lines get idempotency keys, so a retried POST resumes instead of
duplicating. This app is its own process: never the public webhook endpoint.

OpenAPI description: docs/openapi.yaml (checked against this app by schemathesis in
tests/test_api_schema.py).
"""

from __future__ import annotations

import hmac
import json
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import redis
import structlog
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from worker import logs
from worker.batchfile import BatchFile
from worker.chains import ChainItem, chain_from_dict
from worker.domain import JobState, check_key, is_job_id
from worker.errors import FieldError, ValidationError
from worker.producer import Item, Producer, check_budget, job_json
from worker.settings import Settings

log = structlog.get_logger("kq.api")
T = TypeVar("T")

# One job is a small object; a batch is streamed to disk up to this size.
MAX_JOB_BYTES = 64 * 1024
DEFAULT_MAX_BATCH_BYTES = 64 * 1024 * 1024
MAX_ERRORS_RETURNED = 100
# A batch receipt lists its job ids up to this many items (beyond: GET .../jobs).
MAX_RECEIPT_JOB_IDS = 10_000
PAGE_LIMIT_DEFAULT = 100
PAGE_LIMIT_MAX = 1000
_COPY_CHUNK = 1 << 16
# Query numbers as JSON writes them: no `inf`, `nan`, `1_000` or spaces.
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\Z")
_CURSOR = re.compile(r"[0-9]{1,12}\Z")
_LIMIT = re.compile(r"[0-9]{1,4}\Z")
_STATES = tuple(s.value for s in JobState)


def create_app(
    producer: Producer, *, token: str, max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
) -> Flask:
    """Build the API around a Producer; `token` is the bearer token every call needs."""
    if not token:
        raise ValueError("an API token is required (KQ_API_TOKEN)")
    app = Flask("producer_api")
    # `//` in a path is a 404 like any unknown path, not a redirect to another one.
    app.url_map.merge_slashes = False
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
        # Werkzeug's own answers (404, 405, 500, ...) in our shape, keeping their headers
        # (405's `Allow`).
        response = error(
            exc.code or 500, (exc.name or "error").lower().replace(" ", "_"), exc.description or ""
        )
        for name, value in exc.get_headers():
            if name.lower() not in ("content-type", "content-length"):
                response.headers[name] = value
        return response

    @app.post("/v1/jobs")
    def create_job() -> Response:
        data = _json_object_body(MAX_JOB_BYTES)
        errors: list[FieldError] = []
        batch_id = _collect(errors, lambda: check_key("batch_id", data.get("batch_id")))
        item = _collect(errors, lambda: Item.coerce(data))
        if errors or item is None:
            raise ValidationError(errors)
        receipt = producer.enqueue_one(item, batch_id=batch_id or "")
        job = producer.get_job(item.job_id)
        response = jsonify(
            {
                "job_id": item.job_id,
                "state": job.state.value if job else JobState.QUEUED.value,
                "created": receipt.created,
                "existing": receipt.existing,
                "resent": receipt.resent,
            }
        )
        response.status_code = 201 if receipt.created else 200
        response.headers["Location"] = f"/v1/jobs/{item.job_id}"
        return response

    @app.post("/v1/chains")
    def create_chain() -> Response:
        data = _json_object_body(MAX_JOB_BYTES)
        errors: list[FieldError] = []
        batch_id = _collect(errors, lambda: check_key("batch_id", data.pop("batch_id", None)))
        item = _collect(errors, lambda: chain_from_dict(data))
        if errors or item is None:
            raise ValidationError(errors)
        write = producer.enqueue_chain(item, batch_id=batch_id or "")
        response = jsonify(
            {
                "chain_id": write.chain_id,
                "state": write.state,
                "created": write.created,
                "job_ids": [job_id for job_id, _, _ in item.first_jobs()],
                "price_usd_if_completed": item.price_micros / 1_000_000,
            }
        )
        response.status_code = 201 if write.created else 200
        response.headers["Location"] = f"/v1/chains/{write.chain_id}"
        return response

    @app.get("/v1/chains/<chain_id>")
    def get_chain(chain_id: str) -> Response:
        found = producer.chain_json(chain_id) if is_job_id(chain_id) else None
        if found is None:
            return error(404, "not_found", f"no chain {chain_id[:64]!r} (unknown, or expired)")
        return jsonify(found)

    @app.post("/v1/chains/<chain_id>/cancel")
    def cancel_chain(chain_id: str) -> Response:
        chain = producer.get_chain(chain_id) if is_job_id(chain_id) else None
        if chain is None:
            return error(404, "not_found", f"no chain {chain_id[:64]!r}")
        if chain.terminal:
            return error(409, "conflict", f"the chain is already {chain.state}")
        cancelled = producer.cancel_chain(chain_id)
        return jsonify({"chain_id": chain_id, "cancelled_jobs": cancelled})

    @app.post("/v1/batches")
    def create_batch() -> Response:
        errors: list[FieldError] = []
        batch_id = _collect(errors, lambda: check_key("batch_id", _query("batch_id")))
        budget = _collect(errors, lambda: _budget(_query("budget_usd")))
        if errors:
            raise ValidationError(errors)
        if (request.content_length or 0) > max_batch_bytes:
            raise RequestEntityTooLarge()
        with _spooled_body(max_batch_bytes) as path:
            jsonl = _to_jsonl(path)
            with BatchFile(str(jsonl), "jsonl", field_name="body") as batch:
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
                # Keys made up per line only when the client names the batch: then a
                # retried POST resumes. A line's own idempotency_key always counts.
                items: Iterator[Item | ChainItem] = batch.items(
                    batch_id or "-", auto_keys=bool(batch_id)
                )
                receipt = producer.enqueue_batch(
                    items,
                    batch_id=batch_id or None,
                    budget_usd=budget,
                    keep_job_ids=scan.valid <= MAX_RECEIPT_JOB_IDS,
                )
        body = receipt.as_dict()
        body.setdefault("job_ids", None)
        response = jsonify(body)
        response.status_code = 201 if receipt.created else 200
        response.headers["Location"] = f"/v1/batches/{receipt.batch_id}"
        return response

    @app.get("/v1/jobs/<job_id>")
    def get_job(job_id: str) -> Response:
        job = producer.get_job(job_id) if is_job_id(job_id) else None
        if job is None:
            return error(404, "not_found", f"no job {job_id[:64]!r} (unknown, or expired)")
        return jsonify(job_json(job))

    @app.get("/v1/batches/<batch_id>")
    def get_batch(batch_id: str) -> Response:
        progress = producer.batch_progress(batch_id)
        if progress is None:
            return error(404, "not_found", f"no batch {batch_id[:64]!r}")
        return jsonify(progress.as_dict())

    @app.get("/v1/batches/<batch_id>/jobs")
    def list_batch_jobs(batch_id: str) -> Response:
        errors: list[FieldError] = []
        state = _collect(errors, lambda: _state(_query("state")))
        limit = _collect(errors, lambda: _limit(_query("limit")))
        start = _collect(errors, lambda: _cursor(_query("cursor")))
        if errors:
            raise ValidationError(errors)
        if producer.batch_progress(batch_id) is None:
            return error(404, "not_found", f"no batch {batch_id[:64]!r}")
        jobs, after = producer.batch_jobs_page(
            batch_id, start=start or 0, limit=limit or PAGE_LIMIT_DEFAULT, state=state
        )
        return jsonify(
            {
                "batch_id": batch_id,
                "jobs": [job_json(job) for job in jobs],
                "next_cursor": None if after is None else str(after),
            }
        )

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


def _collect(errors: list[FieldError], check: Callable[[], T]) -> T | None:
    """Run one check; on a ValidationError keep its fields in `errors` and answer None,
    so that a request with several problems names them all."""
    try:
        return check()
    except ValidationError as exc:
        errors.extend(exc.errors)
        return None


def _query(name: str) -> str | None:
    """A query parameter that takes one value: given twice is an error, not a choice."""
    values = request.args.getlist(name)
    if len(values) > 1:
        raise ValidationError.single(name, f"given {len(values)} times; give it once")
    return values[0] if values else None


def _read_body(limit: int) -> bytes:
    """The whole request body (chunked or not), refusing more than `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while chunk := request.stream.read(min(_COPY_CHUNK, limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise RequestEntityTooLarge()
    return b"".join(chunks)


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _json_object_body(limit: int) -> dict[str, Any]:
    """The request body as a JSON object of at most `limit` bytes (413 / 422 otherwise)."""
    if (request.content_length or 0) > limit:
        raise RequestEntityTooLarge()
    data = _json_body(_read_body(limit))
    if not isinstance(data, dict):
        raise ValidationError.single("body", "expected a JSON object")
    return data


def _json_body(raw: bytes) -> object:
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except ValueError as exc:
        raise ValidationError.single("body", f"not valid JSON ({exc})") from None
    except RecursionError:
        raise ValidationError.single("body", "not valid JSON (nested too deeply)") from None


def _budget(raw: str | None) -> float | None:
    if raw is None:
        return None
    if not _JSON_NUMBER.match(raw):
        raise ValidationError.single("budget_usd", "expected an amount in USD, e.g. 25 or 12.5")
    return check_budget(float(raw), "budget_usd")


def _state(raw: str | None) -> JobState | None:
    if raw is None:
        return None
    if raw not in _STATES:
        raise ValidationError.single("state", f"expected one of {', '.join(_STATES)}")
    return JobState(raw)


def _limit(raw: str | None) -> int | None:
    if raw is None:
        return None
    if not _LIMIT.match(raw) or not 1 <= int(raw) <= PAGE_LIMIT_MAX:
        raise ValidationError.single("limit", f"expected an integer from 1 to {PAGE_LIMIT_MAX}")
    return int(raw)


def _cursor(raw: str | None) -> int | None:
    if raw is None:
        return None
    if not _CURSOR.match(raw):
        raise ValidationError.single("cursor", "expected a next_cursor of an earlier page")
    return int(raw)


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
    """A JSON-array body becomes JSONL beside it (item N on line N); a JSONL body is used
    as it is."""
    with path.open("rb") as fh:
        head = fh.read(_COPY_CHUNK).lstrip()
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip()
    if not head.startswith(b"["):
        return path
    with path.open("rb") as fh:
        raw = fh.read()
    data = _json_body(raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw)
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
