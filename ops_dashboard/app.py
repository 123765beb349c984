"""The dashboard app: one static page that polls a JSON API, behind `KQ_OPS_TOKEN`.

Routes (all /api answers are JSON; errors are `{"error": message}`):
    GET  /                 the page (or the log-in form when not logged in)
    POST /login            form field `token`; sets the session cookie
    GET  /login?token=...  the same from a link (kiosks, tests); redirects to / at once
    GET  /api/session      a CSRF token for this session: {"csrf", "expires_at", "auth"}
    GET  /api/status       the `worker.status` snapshot (as `kq status --json`), plus
                           `batches`: each running batch's progress (`Producer.batch_progress`:
                           queued, in flight, rate, ETA, cost and budget)
    GET  /api/jobs/<id>    one job, its timeline, its polls and its result event
    GET  /api/batches/<id> one batch's progress
    GET  /api/dead-letters failed jobs, newest first; `?reason=`, `?batch=`, `?limit=`
    GET  /static/<file>    the page's script and style (no CDN: works offline)
    GET  /healthz          no login needed; says nothing but "ok"

    POST /api/jobs/<id>/cancel         Producer.cancel_job     200 / 404 / 409
    POST /api/batches/<id>/cancel      Producer.cancel_batch   200 / 404 / 409
    POST /api/jobs/<id>/redrive        Producer.redrive        200 / 404 / 409
    POST /api/dead-letters/redrive     Producer.redrive of {"job_ids": [...]} (at most 200)

Every POST needs the token (cookie or bearer) and a CSRF token in the `X-CSRF-Token`
header (see `ops_dashboard.security`): without one it is refused with 403 before
anything is read or written; a browser's cross-site request (`Sec-Fetch-Site`) is
refused too. The page asks for a confirmation before it sends any of them.

It is a separate app and process from the webhook receiver on purpose: the receiver
faces the internet, this shows every job. Authentication is a bearer token
(`Authorization: Bearer <token>`) or a session cookie holding a signed, expiring session
id, so the token itself is never stored in the browser or shown on a page. Pages carry a
strict Content-Security-Policy (no inline script) and the script writes job data with
textContent only, so provider error strings cannot inject markup.
"""

from __future__ import annotations

import functools
import hmac
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import structlog
from flask import Flask, Response, redirect, request, send_from_directory
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as WerkzeugResponse

from ops_dashboard.security import BEARER, CSRF_HEADER, SESSION_TTL_S, Signer
from ops_dashboard.views import (
    DLQ_LIST_MAX,
    batch_row,
    dead_letters,
    job_record,
    job_view,
    running_batches,
    timeline,
)
from worker.admission import Admission
from worker.domain import Job, JobState
from worker.errors import ValidationError
from worker.producer import Producer
from worker.request import check_key
from worker.snapshot import StatusConfig
from worker.status import collect

STATIC_DIR = Path(__file__).parent / "static"
COOKIE = "kq_ops"
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_REDRIVABLE = (JobState.FAILED, JobState.CANCELLED)
# A browser says where a request comes from; these may change state (none: typed URL).
_SAME_SITE = ("same-origin", "none")

log = structlog.get_logger("kq.dashboard")

__all__ = ["COOKIE", "create_app", "job_record", "job_view", "timeline"]

View = Callable[..., Response]


def create_app(
    *,
    client: redis.Redis,
    token: str,
    deadline_s: float,
    webhooks_enabled: bool,
    status_config: StatusConfig | None = None,
    clock: Callable[[], float] = time.time,
    admission: Admission | None = None,
    producer: Producer | None = None,
) -> Flask:
    """Build the dashboard; `client` is a decode_responses Redis client. `producer` (built
    by `worker.runtime.make_producer`) serves the batch and dead-letter views and the
    actions; without it they answer 503."""
    signer = Signer(token, clock)
    app = Flask("ops_dashboard", static_folder=None)

    def auth_binding() -> str | None:
        """Who is asking: BEARER, a session id, or None (not logged in)."""
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer ") and hmac.compare_digest(
            header[7:].strip().encode(), token.encode()
        ):
            return BEARER
        return signer.session_id(request.cookies.get(COOKIE, ""))

    def authorized() -> bool:
        return auth_binding() is not None

    def login_page(status: int, message: str = "") -> Response:
        html = _LOGIN_HTML.replace("{message}", message)
        return Response(html, status=status, mimetype="text/html")

    def api_error(status: int, message: str, **extra: Any) -> Response:
        body = {"error": message, **extra}
        return Response(json.dumps(body), status=status, mimetype="application/json")

    def answer(body: Any) -> Response:
        return Response(json.dumps(body), mimetype="application/json")

    def reader(view: View) -> View:
        """A GET of the API: logged in; Redis errors become 503."""

        @functools.wraps(view)
        def wrapped(**kwargs: Any) -> Response:
            if not authorized():
                return api_error(401, "missing or wrong token")
            try:
                return view(**kwargs)
            except redis.RedisError as exc:
                return api_error(503, f"Redis unreachable ({type(exc).__name__})")

        return wrapped

    def action(view: Callable[..., Response]) -> View:
        """A state-changing POST: logged in, same site, a valid CSRF token, a producer."""

        @functools.wraps(view)
        def wrapped(**kwargs: Any) -> Response:
            binding = auth_binding()
            if binding is None:
                return api_error(401, "missing or wrong token")
            if request.headers.get("Sec-Fetch-Site", "same-origin") not in _SAME_SITE:
                return api_error(403, "cross-site request refused")
            if not signer.csrf_ok(binding, request.headers.get(CSRF_HEADER, "")):
                return api_error(
                    403,
                    f"missing, expired or invalid CSRF token: send the {CSRF_HEADER} "
                    "header with a token from GET /api/session",
                )
            if producer is None:
                return api_error(503, "actions are not available: no producer configured")
            try:
                return view(producer, **kwargs)
            except redis.RedisError as exc:
                return api_error(503, f"Redis unreachable ({type(exc).__name__})")

        return wrapped

    def need_producer() -> Producer:
        if producer is None:
            raise _Unavailable()
        return producer

    @app.errorhandler(_Unavailable)
    def unavailable(_exc: _Unavailable) -> Response:
        return api_error(503, "not available: no producer configured")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> WerkzeugResponse:
        # The API's own errors are JSON; so are the ones routing raises (404, 405).
        response = exc.get_response()
        if request.path.startswith("/api/"):
            response.set_data(json.dumps({"error": exc.description or exc.name}))
            response.mimetype = "application/json"
        return response

    @app.after_request
    def headers(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = _CSP
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.get("/healthz")
    def healthz() -> Response:
        return Response('{"result":"ok"}', mimetype="application/json")

    @app.route("/login", methods=["GET", "POST"])
    def login() -> WerkzeugResponse:
        given = request.form.get("token", "") if request.method == "POST" else ""
        given = given or request.args.get("token", "")
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            return login_page(401, "That token is not right." if given else "")
        response = redirect("/", code=303)
        response.set_cookie(
            COOKIE, signer.new_session(), httponly=True, samesite="Strict", max_age=SESSION_TTL_S
        )
        return response

    @app.get("/")
    def index() -> Response:
        if not authorized():
            return login_page(401)
        return send_from_directory(STATIC_DIR, "index.html", mimetype="text/html")

    @app.get("/static/<path:name>")
    def static_file(name: str) -> Response:
        # Script and style are not secret, but only logged-in pages use them.
        if not authorized():
            return api_error(401, "log in first")
        return send_from_directory(STATIC_DIR, name)

    # --- reads --------------------------------------------------------------------

    @app.get("/api/session")
    def api_session() -> Response:
        binding = auth_binding()
        if binding is None:
            return api_error(401, "missing or wrong token")
        csrf, expires_at = signer.new_csrf(binding)
        kind = "bearer" if binding == BEARER else "session"
        return answer({"csrf": csrf, "expires_at": expires_at, "auth": kind})

    @app.get("/api/status")
    @reader
    def api_status() -> Response:
        snap = collect(
            client,
            deadline_s=deadline_s,
            webhooks_enabled=webhooks_enabled,
            now=clock(),
            config=status_config,
            admission=admission,
        )
        body = snap.to_json()
        ids = [b.batch_id for b in snap.cost.running_batches]
        body["batches"] = [] if producer is None else running_batches(producer, ids)
        return answer(body)

    @app.get("/api/jobs/<job_id>")
    @reader
    def api_job(job_id: str) -> Response:
        job_id = job_id.strip().lower()
        if not _JOB_ID.match(job_id):
            return api_error(400, "job id: expected 32 hexadecimal characters")
        found = job_view(client, job_id)
        if found is None:
            return api_error(404, f"no job {job_id} (unknown, or its record expired)")
        return answer(found)

    @app.get("/api/batches/<path:batch_id>")
    @reader
    def api_batch(batch_id: str) -> Response:
        bad = _bad_batch_id(batch_id)
        if bad:
            return api_error(400, bad)
        progress = need_producer().batch_progress(batch_id)
        if progress is None:
            return api_error(404, f"no batch {batch_id} (unknown, or its record expired)")
        return answer(batch_row(progress))

    @app.get("/api/dead-letters")
    @reader
    def api_dead_letters() -> Response:
        try:
            limit = int(request.args.get("limit", "50"))
        except ValueError:
            return api_error(400, f"limit: expected an integer from 1 to {DLQ_LIST_MAX}")
        if not 1 <= limit <= DLQ_LIST_MAX:
            return api_error(400, f"limit: expected an integer from 1 to {DLQ_LIST_MAX}")
        return answer(
            dead_letters(
                need_producer(),
                reason=request.args.get("reason", ""),
                batch_id=request.args.get("batch", ""),
                limit=limit,
            )
        )

    # --- actions ------------------------------------------------------------------

    def find_job(prod: Producer, job_id: str) -> Job | Response:
        """The job an action names, or the JSON error (400 malformed id, 404 unknown)."""
        if not _JOB_ID.match(job_id):
            return api_error(400, "job id: expected 32 hexadecimal characters")
        job = prod.get_job(job_id)
        if job is None:
            return api_error(404, f"no job {job_id} (unknown, or its record expired)")
        return job

    @app.post("/api/jobs/<job_id>/cancel")
    @action
    def api_cancel_job(prod: Producer, job_id: str) -> Response:
        job_id = job_id.strip().lower()
        job = find_job(prod, job_id)
        if isinstance(job, Response):
            return job
        if job.terminal:
            return api_error(409, f"the job is already {job.state.value}", state=job.state.value)
        if not prod.cancel_job(job_id):  # it ended meanwhile
            now = prod.get_job(job_id)
            state = now.state.value if now else "gone"
            return api_error(409, f"the job is already {state}", state=state)
        log.info("dashboard.cancel_job", job_id=job_id)
        return answer({"job_id": job_id, "state": JobState.CANCELLED.value})

    @app.post("/api/batches/<path:batch_id>/cancel")
    @action
    def api_cancel_batch(prod: Producer, batch_id: str) -> Response:
        bad = _bad_batch_id(batch_id)
        if bad:
            return api_error(400, bad)
        progress = prod.batch_progress(batch_id)
        if progress is None:
            return api_error(404, f"no batch {batch_id} (unknown, or its record expired)")
        if progress.done:
            return api_error(409, "every job of the batch is already finished")
        cancelled = prod.cancel_batch(batch_id)
        after = prod.batch_progress(batch_id)
        if cancelled == 0 and (after is None or after.done):
            return api_error(409, "every job of the batch is already finished")
        log.info("dashboard.cancel_batch", batch_id=batch_id, cancelled=cancelled)
        body: dict[str, Any] = {"batch_id": batch_id, "cancelled": cancelled}
        body["progress"] = None if after is None else batch_row(after)
        return answer(body)

    @app.post("/api/jobs/<job_id>/redrive")
    @action
    def api_redrive_job(prod: Producer, job_id: str) -> Response:
        job_id = job_id.strip().lower()
        job = find_job(prod, job_id)
        if isinstance(job, Response):
            return job
        if job.state not in _REDRIVABLE:
            return api_error(
                409,
                f"only failed or cancelled jobs can be redriven; this one is {job.state.value}",
                state=job.state.value,
            )
        new_ids = prod.redrive([job_id])
        if job_id not in new_ids:
            return api_error(409, "the job can no longer be redriven")
        log.info("dashboard.redrive", job_id=job_id, new_job_id=new_ids[job_id])
        return answer({"job_id": job_id, "new_job_id": new_ids[job_id]})

    @app.post("/api/dead-letters/redrive")
    @action
    def api_redrive_many(prod: Producer) -> Response:
        body = request.get_json(silent=True)
        ids = body.get("job_ids") if isinstance(body, dict) else None
        if (
            not isinstance(ids, list)
            or not 1 <= len(ids) <= DLQ_LIST_MAX
            or not all(isinstance(i, str) and _JOB_ID.match(i) for i in ids)
        ):
            return api_error(
                400,
                f'expected a JSON body {{"job_ids": [...]}}: 1 to {DLQ_LIST_MAX} job ids '
                "of 32 lowercase hexadecimal characters",
            )
        wanted = list(dict.fromkeys(ids))
        jobs = dict(zip(wanted, prod.get_jobs(wanted), strict=True))
        unknown = [i for i, j in jobs.items() if j is None]
        refused = [i for i, j in jobs.items() if j is not None and j.state not in _REDRIVABLE]
        todo = [i for i in wanted if i not in unknown and i not in refused]
        new_ids = prod.redrive(todo) if todo else {}
        log.info("dashboard.redrive", count=len(new_ids))
        return answer({"redriven": new_ids, "unknown": unknown, "not_redrivable": refused})

    return app


class _Unavailable(Exception):
    """A view needs the producer, and the app was built without one."""


def _bad_batch_id(batch_id: str) -> str:
    try:
        check_key("batch id", batch_id)
    except ValidationError as exc:
        return "; ".join(str(e) for e in exc.errors)
    return ""


_LOGIN_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kontext-queue ops: log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><main id="login">
<h1>kontext-queue ops</h1>
<p>{message}</p>
<form method="post" action="/login">
<label>Ops token (KQ_OPS_TOKEN) <input type="password" name="token" autocomplete="off"
 autofocus></label> <button type="submit">Log in</button>
</form></main></body></html>
"""
