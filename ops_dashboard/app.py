"""The dashboard app: one static page that polls a JSON API, behind `KQ_OPS_TOKEN`.

Routes:
    GET  /                 the page (or the log-in form when not logged in)
    POST /login            form field `token`; sets the session cookie
    GET  /login?token=...  the same from a link (kiosks, tests); redirects to / at once
    GET  /api/status       the `worker.status` snapshot (as `kq status --json`)
    GET  /api/jobs/<id>    one job, its timeline and its result event
    GET  /static/<file>    the page's script and style (no CDN: works offline)
    GET  /healthz          no login needed; says nothing but "ok"

It is a separate app and process from the webhook receiver on purpose: the receiver
faces the internet, this shows every job. Authentication is a bearer token
(`Authorization: Bearer <token>`) or a session cookie holding an HMAC of the token,
so the token itself is never stored in the browser or shown on a page. Pages carry a
strict Content-Security-Policy (no inline script) and the script writes job data with
textContent only, so provider error strings cannot inject markup.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from flask import Flask, Response, redirect, request, send_from_directory
from werkzeug.wrappers import Response as WerkzeugResponse

from worker import keys
from worker.admission import Admission
from worker.domain import Job
from worker.events import decode_event
from worker.snapshot import StatusConfig
from worker.status import collect
from worker.store import decode_job

STATIC_DIR = Path(__file__).parent / "static"
COOKIE = "kq_ops"
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def create_app(
    *,
    client: redis.Redis,
    token: str,
    deadline_s: float,
    webhooks_enabled: bool,
    status_config: StatusConfig | None = None,
    clock: Callable[[], float] = time.time,
    admission: Admission | None = None,
) -> Flask:
    """Build the dashboard; `client` is a decode_responses Redis client."""
    if not token:
        raise ValueError("the dashboard needs a non-empty token")
    session_value = hmac.new(token.encode(), b"kq-ops-session", hashlib.sha256).hexdigest()
    app = Flask("ops_dashboard", static_folder=None)

    def authorized() -> bool:
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer ") and hmac.compare_digest(
            header[7:].strip().encode(), token.encode()
        ):
            return True
        cookie = request.cookies.get(COOKIE, "")
        return bool(cookie) and hmac.compare_digest(cookie.encode(), session_value.encode())

    def login_page(status: int, message: str = "") -> Response:
        html = _LOGIN_HTML.replace("{message}", message)
        return Response(html, status=status, mimetype="text/html")

    def api_error(status: int, message: str) -> Response:
        return Response(json.dumps({"error": message}), status=status, mimetype="application/json")

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
            COOKIE, session_value, httponly=True, samesite="Strict", max_age=12 * 3600
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

    @app.get("/api/status")
    def api_status() -> Response:
        if not authorized():
            return api_error(401, "missing or wrong token")
        try:
            snap = collect(
                client,
                deadline_s=deadline_s,
                webhooks_enabled=webhooks_enabled,
                now=clock(),
                config=status_config,
                admission=admission,
            )
        except redis.RedisError as exc:
            return api_error(503, f"Redis unreachable ({type(exc).__name__})")
        return Response(json.dumps(snap.to_json()), mimetype="application/json")

    @app.get("/api/jobs/<job_id>")
    def api_job(job_id: str) -> Response:
        if not authorized():
            return api_error(401, "missing or wrong token")
        job_id = job_id.strip().lower()
        if not _JOB_ID.match(job_id):
            return api_error(400, "job id: expected 32 hexadecimal characters")
        try:
            found = job_view(client, job_id)
        except redis.RedisError as exc:
            return api_error(503, f"Redis unreachable ({type(exc).__name__})")
        if found is None:
            return api_error(404, f"no job {job_id} (unknown, or its record expired)")
        return Response(json.dumps(found), mimetype="application/json")

    return app


def job_view(client: redis.Redis, job_id: str) -> dict[str, Any] | None:
    """A job's record (selected fields), its timeline and its result event."""
    raw: Any = client.hgetall(keys.job(job_id))
    if not raw or "state" not in raw:
        return None
    job = decode_job(raw)
    # Bookkeeping on the record that the domain's Job does not carry.
    event_id: str = raw.get("event_id", "")
    updated_at = _float(raw.get("updated_at"))
    event = None
    if event_id:
        entries: Any = client.xrange(keys.EVENTS, event_id, event_id)
        if entries:
            event = decode_event(*entries[0]).to_dict()
    return {
        "job": job_record(job, event_id),
        "timeline": timeline(job, updated_at),
        "event": event,
    }


def job_record(job: Job, event_id: str) -> dict[str, Any]:
    """The job fields the page shows (numbers as numbers); the rest stays server-side."""
    return {
        "id": job.id,
        "state": job.state.value,
        "batch_id": job.batch_id,
        "prediction_id": job.prediction_id,
        "attempts": job.attempts,
        "poll_count": job.poll_count,
        "resolved_by": job.resolved_by,
        "reason": job.reason,
        "error": job.error,
        "task_code": job.task_code,
        "outputs": list(job.outputs),
        "request": dict(job.request),
        "version": job.version,
        "ambiguous": job.ambiguous,
        "idempotency_key": job.idempotency_key,
        "event_id": event_id,
    }


def timeline(job: Job, updated_at: float) -> list[dict[str, Any]]:
    """The steps a job went through, oldest first, from the times on its record."""
    steps: list[tuple[float, str, str]] = [
        (job.created_at, "enqueued", f"batch {job.batch_id or '-'}"),
        (job.submitting_at, "submit started", f"attempt {job.attempts or '?'}"),
        (job.submitted_at, "accepted by WaveSpeed", f"task {job.prediction_id or '-'}"),
    ]
    if job.terminal:
        detail = f"by {job.resolved_by or '-'}"
        if job.reason:
            detail += f"; {job.reason}: {job.error[:300]}"
        steps.append((job.finished_at, job.state.value, detail))
    out: list[dict[str, Any]] = [
        {"t": at, "step": what, "detail": detail} for at, what, detail in steps if at > 0
    ]
    if not job.terminal:
        out.append(
            {
                "t": updated_at,
                "step": f"now {job.state.value}",
                "detail": f"polled {job.poll_count} times",
            }
        )
    out.sort(key=lambda s: float(s["t"]))
    return out


def _float(value: str | None) -> float:
    try:
        return float(value or 0)
    except ValueError:
        return 0.0


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
