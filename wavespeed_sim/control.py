"""Test/control endpoints under ``/_sim/``: ground truth and knobs, no auth, plain JSON.

These are not part of WaveSpeed's API (no envelope, on purpose: nobody can mistake one
for the other). Errors answer ``{"error": message}`` with status 400 or 404.

    GET  /_sim/health                 {"ok": true, "uptime_s", "tasks", "active",
                                       "pending_deliveries", "balance", "clock"}
    GET  /_sim/tasks                  {"tasks": [task record, ...]} in submit order
    GET  /_sim/tasks/<id>             one task record
    GET  /_sim/requests?kind=&since=  {"requests": [request entry, ...]} oldest first
    GET  /_sim/config                 the config in force
    POST /_sim/config  {knob: value}  patch knobs at runtime; answers the new config
    GET  /_sim/clock                  {"now": iso, "offset_s": float}
    POST /_sim/clock/advance {"seconds": N}   move the sim clock; answers like GET
    POST /_sim/reset                  {"ok": true}: everything back to how it started
"""

from __future__ import annotations

import math

from flask import Blueprint, Response, jsonify, request

from wavespeed_sim.config import ConfigError
from wavespeed_sim.engine import Simulator


def _fail(status: int, message: str) -> Response:
    response = jsonify({"error": message})
    response.status_code = status
    return response


def control_blueprint(sim: Simulator) -> Blueprint:
    """The ``/_sim`` routes bound to ``sim``."""
    bp = Blueprint("sim_control", __name__, url_prefix="/_sim")

    @bp.get("/health")
    def health() -> Response:
        return jsonify(sim.health())

    @bp.get("/tasks")
    def tasks() -> Response:
        return jsonify({"tasks": sim.tasks_snapshot()})

    @bp.get("/tasks/<task_id>")
    def task(task_id: str) -> Response:
        found = sim.tasks_snapshot(task_id)
        return jsonify(found[0]) if found else _fail(404, f"no task {task_id}")

    @bp.get("/requests")
    def requests_log() -> Response:
        kind = request.args.get("kind") or None
        try:
            since = int(request.args.get("since", "0"))
        except ValueError:
            return _fail(400, "since: must be an integer (a request seq)")
        return jsonify({"requests": sim.requests.entries(kind=kind, since=since)})

    @bp.get("/config")
    def get_config() -> Response:
        return jsonify(sim.config.as_dict())

    @bp.post("/config")
    def patch_config() -> Response:
        patch = request.get_json(silent=True)
        if not isinstance(patch, dict):
            return _fail(400, "body: must be a JSON object of knob: value")
        try:
            return jsonify(sim.patch_config(patch).as_dict())
        except ConfigError as exc:
            return _fail(400, str(exc))

    @bp.get("/clock")
    def clock() -> Response:
        return jsonify(sim.clock_info())

    @bp.post("/clock/advance")
    def advance() -> Response:
        body = request.get_json(silent=True)
        seconds = body.get("seconds") if isinstance(body, dict) else None
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not math.isfinite(seconds)
            or seconds < 0
        ):
            return _fail(400, "seconds: required, a non-negative number")
        return jsonify(sim.advance_clock(float(seconds)))

    @bp.post("/reset")
    def reset() -> Response:
        sim.reset()
        return jsonify({"ok": True})

    return bp
