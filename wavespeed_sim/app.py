"""The HTTP face of the simulator: WaveSpeed's v3 API, uploads and output files.

Every ``/api/v3`` answer is the envelope ``{"code", "message", "data"}`` with ``code``
equal to the HTTP status; errors carry ``data: null`` and a message naming the problem
(the field, for bad parameters). Every request except ``/_sim/*`` lands in the request
log with a *kind* (``submit``, ``result``, ``list``, ...), the status answered, and the
fault applied if any. The test/control endpoints live in ``control.py``.

Submits are the hot path (one per task, at whatever rate the client sends), so
``POST /api/v3/<model>`` is served by ``FastSubmit``, plain WSGI in front of Flask: a
Flask request (contexts, routing, hooks) cost more CPU than the submit itself. Both it
and the Flask view answer through ``answer_submit`` and log through ``log_entry``, so
the two give the same bytes and the same request-log entry; anything unusual (no valid
API key, no Content-Length, a chunked or large body) is left to Flask.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import io
import json
import mimetypes
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, g, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException, InternalServerError
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.sansio.utils import get_current_url, get_host
from werkzeug.wrappers import Request

from wavespeed_sim.config import MODEL
from wavespeed_sim.control import control_blueprint
from wavespeed_sim.engine import Simulator
from wavespeed_sim.images import render_output
from wavespeed_sim.params import (
    SIM_MODELS,
    ParamError,
    validate_delete,
    validate_list,
    validate_submit,
    validate_webhook,
)

MAX_UPLOAD_BYTES = 200 * 1024 * 1024  # the SDK's documented upload limit


def submit_endpoint(model: str) -> str:
    """The endpoint name of a model's submit route (`submit` for Kontext [max])."""
    if model == MODEL:
        return "submit"
    return "submit_" + model.removeprefix("wavespeed-ai/flux-kontext-").replace("/", "_")


# Endpoint name -> request-log kind.
KINDS = {
    **{submit_endpoint(model): "submit" for model in SIM_MODELS},
    "result": "result",
    "list_predictions": "list",
    "delete_predictions": "delete",
    "webhook_secret": "secret",
    "balance": "balance",
    "upload_ticket": "upload_ticket",
    "upload_put": "upload_put",
    "upload_binary": "upload_binary",
    "media": "media",
    "output": "output",
    "unknown_api": "unknown",
}


# The bytes Flask's jsonify writes outside debug mode (compact, ASCII, keys in order, a
# trailing newline), from one encoder made once: jsonify goes through the app's JSON
# provider and builds an encoder per call. The envelopes hold plain JSON values only.
_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))


def _json_response(envelope: dict[str, object], status: int = 200) -> Response:
    return Response(_ENCODER.encode(envelope) + "\n", status=status, mimetype="application/json")


def _ok_envelope(data: object) -> dict[str, object]:
    return {"code": 200, "message": "success", "data": data}


def error_envelope(status: int, message: str) -> dict[str, object]:
    return {"code": status, "message": message, "data": None}


def ok(data: object) -> Response:
    """A success envelope."""
    return _json_response(_ok_envelope(data))


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """An error envelope whose ``code`` is the HTTP status."""
    response = _json_response(error_envelope(status, message), status)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def auth_refusal(sim: Simulator, header: str) -> str | None:
    """Why an ``Authorization`` header is refused (the 401's message), or None if accepted."""
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return "missing API key: send 'Authorization: Bearer <key>'"
    expected = sim.config.api_key
    if expected is not None and not hmac.compare_digest(key.encode(), expected.encode()):
        return "invalid API key"
    return None


_BLANK = object()  # parse_json_body's answer for an empty (or all-whitespace) body


def parse_json_body(raw: bytes) -> Any:
    """The parsed JSON body, or ``_BLANK``; ParamError("body") when it is not JSON."""
    if not raw.strip():
        return _BLANK
    try:
        return json.loads(raw)
    except ValueError:
        raise ParamError("body", "is not valid JSON") from None


def _json_body(*, required: bool = True) -> Any:
    """The parsed JSON body; ParamError("body") when it is not JSON."""
    body = parse_json_body(request.get_data(cache=True))
    if body is _BLANK:
        return {} if required else None
    g.body = body
    return body


@dataclass(frozen=True)
class SubmitAnswer:
    """A submit's answer, and what the request log records of it besides the request."""

    status: int
    envelope: dict[str, object]
    headers: dict[str, str] = field(default_factory=dict)
    dropped: bool = False  # no answer at all: the connection was shut down
    task_id: str | None = None
    fault: str | None = None
    body: object = None  # the parsed JSON body, as logged (None when blank or not JSON)


def answer_submit(
    sim: Simulator,
    model: str,
    raw: bytes,
    webhook: str | None,
    base_url: str,
    sock: object,
) -> SubmitAnswer:
    """Serve ``POST /api/v3/<model>`` (raw body, the ``webhook`` query parameter, the
    client's socket for a dropped answer): the Flask view and ``FastSubmit`` both call it."""
    logged: object = None
    try:
        body = parse_json_body(raw)
        if body is not _BLANK:
            logged = body
        params = validate_submit(model, {} if body is _BLANK else body)
        hook = validate_webhook(webhook)
    except ParamError as exc:
        return SubmitAnswer(400, error_envelope(400, str(exc)), body=logged)
    outcome = sim.submit(model, params, hook, base_url=base_url)
    task_id, fault = outcome.task_id, outcome.fault
    if outcome.drop_connection:
        if drop_connection(sock):
            return SubmitAnswer(500, {}, dropped=True, task_id=task_id, fault=fault, body=logged)
        # Not under werkzeug's server (e.g. Flask's test client): the closest we can do.
        message = "response lost (simulated ambiguous submit)"
        return SubmitAnswer(504, error_envelope(504, message), {}, False, task_id, fault, logged)
    if outcome.http_status != 200 or task_id is None:
        headers = {}
        if outcome.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, round(outcome.retry_after_s)))
        envelope = error_envelope(outcome.http_status, outcome.message)
        return SubmitAnswer(outcome.http_status, envelope, headers, False, task_id, fault, logged)
    data: object
    if params.get("enable_sync_mode") is True:
        data = sim.wait_final(task_id, sim.config.sync_timeout_s)
    else:
        data = outcome.prediction
    return SubmitAnswer(200, _ok_envelope(data), {}, False, task_id, fault, logged)


def log_entry(
    sim: Simulator,
    req: Request,
    kind: str,
    status: int | None,
    *,
    task_id: str | None = None,
    model: str | None = None,
    fault: str | None = None,
    body: object = None,
) -> None:
    """Add a request to the request log (Flask's after_request hook and FastSubmit)."""
    sim.requests.add(
        method=req.method,
        path=req.path,
        query_string=req.query_string.decode("latin-1"),
        query=req.args.to_dict(),
        kind=kind,
        status=status,
        task_id=task_id,
        model=model,
        fault=fault,
        body=body,
    )


def create_app(sim: Simulator) -> Flask:
    """Build the Flask app serving ``sim``."""
    app = Flask("wavespeed_sim")
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD_BYTES
    if isinstance(app.json, DefaultJSONProvider):
        app.json.sort_keys = False  # keep the spec's key order in predictions

    @app.before_request
    def authenticate() -> Response | None:
        if not request.path.startswith("/api/v3/"):
            return None
        refusal = auth_refusal(sim, request.headers.get("Authorization", ""))
        return None if refusal is None else error(401, refusal)

    @app.after_request
    def log_request(response: Response) -> Response:
        if not request.path.startswith("/_sim/"):
            endpoint = request.url_rule.endpoint if request.url_rule else ""
            log_entry(
                sim,
                request,
                KINDS.get(endpoint, "other"),
                None if g.get("dropped") else response.status_code,
                task_id=g.get("task_id"),
                model=g.get("model"),
                fault=g.get("fault"),
                body=g.get("body"),
            )
        return response

    @app.errorhandler(ParamError)
    def bad_param(exc: ParamError) -> Response:
        return error(400, str(exc))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return error(exc.code or 500, exc.description or exc.name)

    def submit_model(model: str) -> Response:
        # FastSubmit serves most submits; this view the ones it leaves to Flask.
        g.model = model
        answer = answer_submit(
            sim,
            model,
            request.get_data(cache=True),
            request.args.get("webhook"),
            request.host_url.rstrip("/"),
            request.environ.get("werkzeug.socket"),
        )
        g.task_id, g.fault, g.body, g.dropped = (
            answer.task_id,
            answer.fault,
            answer.body,
            answer.dropped,
        )
        if answer.dropped:
            return Response(status=500)  # never reaches the client
        response = _json_response(answer.envelope, answer.status)
        for name, value in answer.headers.items():
            response.headers[name] = value
        return response

    # One submit route per model the provider serves (params.SIM_MODELS), alike in all.
    for model in SIM_MODELS:
        app.add_url_rule(
            f"/api/v3/{model}",
            endpoint=submit_endpoint(model),
            view_func=functools.partial(submit_model, model),
            methods=["POST"],
        )

    @app.get("/api/v3/predictions/<task_id>/result", endpoint="result")
    def result(task_id: str) -> Response:
        g.task_id = task_id
        prediction = sim.get(task_id)
        if prediction is None:
            return error(404, f"prediction {task_id} not found (unknown, deleted or expired)")
        return ok(prediction)

    @app.post("/api/v3/predictions", endpoint="list_predictions")
    def list_predictions() -> Response:
        return ok(sim.list_predictions(validate_list(_json_body(required=False))))

    @app.post("/api/v3/predictions/delete", endpoint="delete_predictions")
    def delete_predictions() -> Response:
        return ok({"deleted_count": sim.delete(validate_delete(_json_body()))})

    @app.get("/api/v3/webhook/secret", endpoint="webhook_secret")
    def webhook_secret() -> Response:
        return ok({"secret": sim.secret()})

    @app.get("/api/v3/balance", endpoint="balance")
    def balance() -> Response:
        return ok({"balance": round(sim.balance(), 6)})

    @app.post("/api/v3/media/uploads", endpoint="upload_ticket")
    def upload_ticket() -> Response:
        # The SDK's two-step upload: a ticket with a presigned-style PUT, then the PUT.
        body = _json_body()
        filename = body.get("filename") if isinstance(body, dict) else None
        if not isinstance(filename, str) or not filename.strip():
            raise ParamError("filename", "required, a non-empty string")
        content_type = body.get("content_type") or _guess_type(filename)
        if not isinstance(content_type, str):
            raise ParamError("content_type", "must be a string")
        upload = sim.uploads.create(_safe_name(filename), content_type)
        base = request.host_url.rstrip("/")
        return ok(
            {
                "upload": {
                    "method": "PUT",
                    "url": f"{base}/upload/{upload.token}",
                    "headers": {"Content-Type": content_type},
                },
                "download_url": f"{base}/media/{upload.token}/{upload.filename}",
            }
        )

    @app.put("/upload/<token>", endpoint="upload_put")
    def upload_put(token: str) -> Response:
        if not sim.uploads.put(token, request.get_data()):
            return error(404, "unknown upload ticket")
        return Response(status=200)

    @app.post("/api/v3/media/upload/binary", endpoint="upload_binary")
    def upload_binary() -> Response:
        file = request.files.get("file")
        if file is None:
            raise ParamError("file", "required, a multipart file field named 'file'")
        filename = _safe_name(file.filename or "upload")
        content_type = file.mimetype or _guess_type(filename)
        data = file.read()
        upload = sim.uploads.create(filename, content_type, data)
        url = f"{request.host_url.rstrip('/')}/media/{upload.token}/{upload.filename}"
        kind = content_type.split("/", 1)[0]
        return ok({"type": kind, "download_url": url, "filename": filename, "size": len(data)})

    @app.get("/media/<token>/<path:filename>", endpoint="media")
    def media(token: str, filename: str) -> Response:
        upload = sim.uploads.get(token)
        if upload is None or upload.data is None:
            return error(404, "no such file")
        return Response(upload.data, mimetype=upload.content_type)

    @app.get("/outputs/<task_id>.jpeg", endpoint="output")
    def output(task_id: str) -> Response:
        g.task_id = task_id
        found = sim.output_image(task_id)
        if found is None:
            # Past the retention (--retention-days) an output is gone, as at WaveSpeed.
            return error(404, "no such output (unknown, not completed, deleted or expired)")
        prompt, aspect_ratio = found
        return Response(render_output(prompt, aspect_ratio), mimetype="image/jpeg")

    @app.route(
        "/api/v3/<path:rest>", endpoint="unknown_api", methods=["GET", "POST", "PUT", "DELETE"]
    )
    def unknown_api(rest: str) -> Response:
        return error(404, f"no such endpoint or model: /api/v3/{rest}")

    app.register_blueprint(control_blueprint(sim))
    fast = FastSubmit(app.wsgi_app, sim, app)
    app.extensions["wavespeed_sim.fast_submit"] = fast  # tests switch it off to compare
    app.wsgi_app = fast  # type: ignore[method-assign]
    return app


def drop_connection(sock: object) -> bool:
    """Lose the response: close the TCP connection without answering (ambiguous submit).

    werkzeug's server exposes the client socket; shutting it down makes the write of the
    response fail quietly (a dropped connection) and the client sees the server hang up
    with no status line at all. False when there is no socket to shut (not under
    werkzeug's server).
    """
    if not isinstance(sock, socket.socket):
        return False
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    return True


# Bodies up to this size are served by FastSubmit (a submit body is a few hundred bytes);
# a bigger one goes to Flask, which enforces MAX_UPLOAD_BYTES (413).
FAST_BODY_LIMIT = 1024 * 1024

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
# A whole answer: the status line's "200 OK" part, headers, body (with a Content-Length).
FastAnswer = tuple[str, list[tuple[str, str]], bytes]


@functools.lru_cache(maxsize=256)
def _host_url(scheme: str, host: str | None, server: tuple[str, int | None] | None) -> str:
    # werkzeug's Request.host_url from the same inputs, made once per Host a client sends
    # (building it, IRI decoding included, cost more than validating the submit).
    return get_current_url(scheme, get_host(scheme, host, server))


def _status_line(status: int) -> str:
    # The status text werkzeug's Response gives a bare code, so both paths send the same.
    return f"{status} {HTTP_STATUS_CODES.get(status, 'unknown').upper()}"


class FastSubmit:
    """WSGI middleware: serves ``POST /api/v3/<model>`` itself, passes the rest on to Flask.

    Same auth check, validation, engine call, answer bytes and request-log entry as the
    Flask view (both go through ``auth_refusal``, ``answer_submit`` and ``log_entry``),
    without Flask's per-request machinery. A request it does not take (another path or
    method, a refused key, no Content-Length, a chunked or big body) reaches Flask as sent.
    """

    def __init__(self, app: WSGIApp, sim: Simulator, flask_app: Flask) -> None:
        self._app = app
        self._sim = sim
        self._flask = flask_app
        self._models = {f"/api/v3/{model}": model for model in SIM_MODELS}
        self.enabled = True

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        answer = self.answer(environ)
        if answer is None:
            return self._app(environ, start_response)
        status, headers, data = answer
        start_response(status, headers)
        return [data]

    def answer(self, environ: dict[str, Any]) -> FastAnswer | None:
        """Serve the request if it is one this takes: (status, headers, body); None to
        leave it to Flask (``environ`` then still holds the whole request). The server's
        handler calls this directly (see server.py), WSGI servers through ``__call__``."""
        model = self._models.get(environ.get("PATH_INFO", ""))
        if (
            model is None
            or not self.enabled
            or environ.get("REQUEST_METHOD") != "POST"
            or environ.get("SCRIPT_NAME")
            or "wsgi.input_terminated" in environ
        ):
            return None
        length = environ.get("CONTENT_LENGTH") or ""
        if (
            not (length.isascii() and length.isdigit())  # int() takes "²" too
            or int(length) > FAST_BODY_LIMIT
            or auth_refusal(self._sim, environ.get("HTTP_AUTHORIZATION", "")) is not None
        ):
            return None  # Flask answers 401, 413, ...
        raw = environ["wsgi.input"].read(int(length))
        if len(raw) < int(length):
            # The client hung up mid-body: Flask answers that (400), from the bytes read so
            # far and the length promised (so its stream sees the same short body).
            environ["wsgi.input"] = io.BytesIO(raw)
            return None
        req = Request(environ)
        try:
            answer = answer_submit(
                self._sim,
                model,
                raw,
                req.args.get("webhook"),
                _host_url(req.scheme, environ.get("HTTP_HOST"), req.server).rstrip("/"),
                environ.get("werkzeug.socket"),
            )
        except Exception:
            # As Flask treats an unhandled exception: raised to the caller (testing), or
            # logged and answered 500 (through the HTTPException handler: an envelope).
            propagate = self._flask.config["PROPAGATE_EXCEPTIONS"]
            if propagate or (propagate is None and (self._flask.testing or self._flask.debug)):
                raise
            self._flask.logger.exception("Exception on %s [POST]", req.path)
            answer = SubmitAnswer(500, error_envelope(500, InternalServerError.description))
        log_entry(
            self._sim,
            req,
            "submit",
            None if answer.dropped else answer.status,
            task_id=answer.task_id,
            model=model,
            fault=answer.fault,
            body=answer.body,
        )
        if answer.dropped:
            # Never reaches the client (its socket is shut): what Flask's Response(500) sends.
            headers = [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", "0")]
            return _status_line(500), headers, b""
        data = (_ENCODER.encode(answer.envelope) + "\n").encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
        headers.extend(answer.headers.items())
        return _status_line(answer.status), headers, data


def _guess_type(filename: str) -> str:
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


def _safe_name(filename: str) -> str:
    """The last path component, so a filename cannot climb out of its URL."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].strip()
    return name or "upload"
