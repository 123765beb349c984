"""The HTTP face of the simulator: WaveSpeed's v3 API, uploads and output files.

Every ``/api/v3`` answer is the envelope ``{"code", "message", "data"}`` with ``code``
equal to the HTTP status; errors carry ``data: null`` and a message naming the problem
(the field, for bad parameters). Every request except ``/_sim/*`` lands in the request
log with a *kind* (``submit``, ``result``, ``list``, ...), the status answered, and the
fault applied if any. The test/control endpoints live in ``control.py``.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import json
import mimetypes
import socket
from typing import Any

from flask import Flask, Response, g, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException

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


def ok(data: object) -> Response:
    """A success envelope."""
    return _json_response({"code": 200, "message": "success", "data": data})


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """An error envelope whose ``code`` is the HTTP status."""
    response = _json_response({"code": status, "message": message, "data": None}, status)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _json_body(*, required: bool = True) -> Any:
    """The parsed JSON body; ParamError("body") when it is not JSON."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {} if required else None
    try:
        body = json.loads(raw)
    except ValueError:
        raise ParamError("body", "is not valid JSON") from None
    g.body = body
    return body


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
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return error(401, "missing API key: send 'Authorization: Bearer <key>'")
        expected = sim.config.api_key
        if expected is not None and not hmac.compare_digest(key.encode(), expected.encode()):
            return error(401, "invalid API key")
        return None

    @app.after_request
    def log_request(response: Response) -> Response:
        if not request.path.startswith("/_sim/"):
            endpoint = request.url_rule.endpoint if request.url_rule else ""
            sim.requests.add(
                method=request.method,
                path=request.path,
                query_string=request.query_string.decode("latin-1"),
                query=request.args.to_dict(),
                kind=KINDS.get(endpoint, "other"),
                status=None if g.get("dropped") else response.status_code,
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
        g.model = model
        params = validate_submit(model, _json_body())
        webhook = validate_webhook(request.args.get("webhook"))
        outcome = sim.submit(model, params, webhook, base_url=request.host_url.rstrip("/"))
        g.task_id, g.fault = outcome.task_id, outcome.fault
        if outcome.drop_connection:
            return drop_connection()
        if outcome.http_status != 200 or outcome.task_id is None:
            headers = {}
            if outcome.retry_after_s is not None:
                headers["Retry-After"] = str(max(1, round(outcome.retry_after_s)))
            return error(outcome.http_status, outcome.message, headers)
        if params.get("enable_sync_mode") is True:
            return ok(sim.wait_final(outcome.task_id, sim.config.sync_timeout_s))
        return ok(outcome.prediction)

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
    return app


def drop_connection() -> Response:
    """Lose the response: close the TCP connection without answering (ambiguous submit).

    werkzeug's server exposes the client socket; shutting it down makes the write of the
    response fail quietly (a dropped connection) and the client sees the server hang up
    with no status line at all.
    """
    g.dropped = True
    sock = request.environ.get("werkzeug.socket")
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        return Response(status=500)  # never reaches the client
    # Not under werkzeug's server (e.g. Flask's test client): the closest we can do.
    return error(504, "response lost (simulated ambiguous submit)")


def _guess_type(filename: str) -> str:
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


def _safe_name(filename: str) -> str:
    """The last path component, so a filename cannot climb out of its URL."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].strip()
    return name or "upload"
