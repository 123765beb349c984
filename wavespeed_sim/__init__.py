"""wavespeed_sim: a faithful local simulator of WaveSpeed AI's v3 API (FLUX.1 Kontext [max]).

A real HTTP server (Flask on werkzeug's threaded server) with in-memory state, a
lifecycle scheduler and a webhook sender, reproducing ``docs/wavespeed-api`` (the
provider spec): the envelope, auth, parameter validation, the task lifecycle with a
queue delay and a concurrency cap, v3-signed webhooks with retries, uploads, balance,
rate limits, 7-day expiry on a controllable clock, and seeded faults. Tests and tools
drive and inspect it through ``/_sim/*``.

Modules:
    config    SimConfig: every knob, its CLI flag and its validation
    signing   the v3 webhook signature (sign and verify)
    params    validation of request bodies per the spec's tables
    state     tasks, uploads, request log, rate limiter, sim clock
    faults    FaultDice: every seeded random decision
    lifecycle the task lifecycle: queue, concurrency cap, ending a task
    engine    Simulator: submits, the scheduler thread, queries, control
    delivery  webhook sender: signed POSTs, retries with backoff, thread pool
    webhook_http  the sender's HTTP client: HTTP/1.1 on kept-alive sockets
    images    output JPEGs drawn with Pillow
    app       create_app(sim): the v3 API, uploads and outputs over HTTP (FastSubmit: submits)
    control   the /_sim/* endpoints
    server    SimServer: start()/stop() in a thread, or serve_forever()
    cli       build_parser() and main(argv) (``python -m wavespeed_sim``, ``kq sim``)
"""

from wavespeed_sim.config import SimConfig
from wavespeed_sim.engine import Simulator
from wavespeed_sim.server import SimServer

__all__ = ["SimConfig", "SimServer", "Simulator"]
