"""`kq` subcommands for operators and downstream consumers: events, status, metrics, dashboard.

Each reads the environment once (`Settings.from_env`, and `KQ_OPS_TOKEN` for the
dashboard) and talks only to Redis: none of them needs a worker or the provider.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

import redis

from worker.errors import ConfigError
from worker.settings import Settings

if TYPE_CHECKING:
    from rich.console import RenderableType

    from worker.snapshot import StatusConfig, StatusSnapshot

DEFAULT_METRICS_PORT = 9808
DEFAULT_DASHBOARD_PORT = 8090
# A group consumer looks for events a dead consumer left unacked this often (at most).
RECLAIM_EVERY_S = 10.0
FOLLOW_BLOCK_MS = 2_000
MIN_OPS_TOKEN_CHARS = 16


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this module's subcommands to the `kq` parser."""
    p = sub.add_parser(
        "events",
        help="print result events: replay, follow, or consume with a consumer group",
        description="Read kq:events (see docs/events.md). Without --group nothing is acked; "
        "with --group/--consumer each event is acked right after it is printed.",
    )
    p.add_argument("--follow", "-f", action="store_true", help="keep waiting for new events")
    p.add_argument("--group", help="consumer group (created on first use)")
    p.add_argument("--consumer", help="this consumer's name in the group (reuse it on restart)")
    p.add_argument(
        "--since",
        help="stream id, duration (15m, 2h), unix seconds, ISO time, 'beginning' or 'now'. "
        "Default: beginning (with --follow and no group: now). With --group: where a new "
        "group starts",
    )
    p.add_argument("--batch", help="only this batch's events")
    p.add_argument(
        "--type",
        action="append",
        choices=("job", "chain", "outputs"),
        help="only events of this type (repeat for several; default: all)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--count", type=int, help="stop after this many events")
    p.add_argument(
        "--reclaim-idle",
        type=float,
        default=60.0,
        metavar="S",
        help="group: take over events another consumer left unacked for S seconds (60)",
    )
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("status", help="queues, jobs, latency, cost, process health, alarms")
    p.add_argument("--watch", "-w", action="store_true", help="refresh in place (Ctrl-C stops)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--json", action="store_true", help="machine-readable snapshot")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("metrics", help="serve Prometheus metrics read from Redis")
    p.add_argument("--port", type=int, default=DEFAULT_METRICS_PORT)
    p.add_argument("--host", default="127.0.0.1")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser(
        "dashboard", help="serve the ops dashboard (needs KQ_OPS_TOKEN; never public)"
    )
    p.add_argument("--port", type=int, default=DEFAULT_DASHBOARD_PORT)
    p.add_argument("--host", default="127.0.0.1")
    p.set_defaults(func=cmd_dashboard)


def _client(settings: Settings) -> redis.Redis:
    from worker import runtime

    return runtime.make_redis(settings)


# --- kq events ---------------------------------------------------------------------------


def cmd_events(args: argparse.Namespace) -> int:
    from worker.events import EventConsumer, follow, parse_since, replay

    if bool(args.group) != bool(args.consumer):
        raise ConfigError("--group and --consumer go together (a consumer is named in a group)")
    if args.count is not None and args.count < 1:
        raise ConfigError("--count: expected an integer >= 1")
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    settings = Settings.from_env()
    client = _client(settings)
    out = _Printer(sys.stdout, as_json=args.json, limit=args.count)
    try:
        if args.group:
            consumer = EventConsumer(
                client,
                args.group,
                args.consumer,
                start=since or "0-0",
                batch_id=args.batch,
                types=args.type,
                reclaim_idle_ms=int(args.reclaim_idle * 1000),
            )
            _consume(consumer, out, follow=args.follow)
        else:
            start = since or ("$" if args.follow else "0-0")
            stream = (
                follow(
                    client, start, batch_id=args.batch, types=args.type, block_ms=FOLLOW_BLOCK_MS
                )
                if args.follow
                else replay(client, start, batch_id=args.batch, types=args.type)
            )
            for event in stream:
                if not out.emit(event):
                    break
    except BrokenPipeError:
        # `kq events | head`: the reader left; unacked events stay pending for next time.
        sys.stderr.close()
    return 0


def _consume(consumer: Any, out: _Printer, *, follow: bool) -> None:
    """Print, then ack, each event: killed in between, the event comes again on restart.

    Ctrl-C and SIGTERM only stop the loop between two events, so a stopped (not
    SIGKILLed) consumer never leaves a printed event unacked: restarted, it goes on
    exactly where it stopped. A SIGKILL can still land between print and ack; that
    event is printed again (at-least-once).
    """
    stop = threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
    try:
        _consume_until(consumer, out, follow=follow, stop=stop)
    finally:
        for restored, handler in previous.items():
            signal.signal(restored, handler)


def _consume_until(consumer: Any, out: _Printer, *, follow: bool, stop: threading.Event) -> None:
    next_reclaim = 0.0
    while not out.done and not stop.is_set():
        batch = []
        if time.monotonic() >= next_reclaim:
            batch = consumer.reclaim(count=out.room(100))
            next_reclaim = time.monotonic() + min(RECLAIM_EVERY_S, consumer.reclaim_idle_ms / 1000)
        if not batch:
            batch = consumer.read(count=out.room(100), block_ms=FOLLOW_BLOCK_MS if follow else None)
        if not batch and not follow:
            return
        for event in batch:
            out.emit(event)
            consumer.ack(event.id)
            if out.done or stop.is_set():
                return  # the rest of this batch stays pending: it comes first next time


class _Printer:
    """Writes events as text or JSON lines, flushed one by one, up to an optional limit."""

    def __init__(self, stream: TextIO, *, as_json: bool, limit: int | None) -> None:
        self.stream = stream
        self.as_json = as_json
        self.limit = limit
        self.printed = 0

    @property
    def done(self) -> bool:
        return self.limit is not None and self.printed >= self.limit

    def room(self, most: int) -> int:
        return most if self.limit is None else max(1, min(most, self.limit - self.printed))

    def emit(self, event: Any) -> bool:
        """Print one event; False once the limit is reached."""
        if self.as_json:
            line = json.dumps(event.to_dict(), separators=(",", ":"))
        else:
            line = _event_line(event)
        self.stream.write(line + "\n")
        self.stream.flush()  # before any ack: what was acked was written
        self.printed += 1
        return not self.done


def _event_line(event: Any) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(event.time))
    if event.type == "chain":
        detail = (
            f"{len(event.outputs)} output(s)"
            if event.state == "completed"
            else f"step {event.failed_step or '-'} {event.reason}: {event.error}".strip(": ")
        )
        return (
            f"{when}  chain {event.state:<9}  {event.chain_id}  batch={event.batch_id or '-'}  "
            f"steps={event.steps} branches={event.branches} run={event.run}  {detail}"
        ).rstrip()
    if event.type == "outputs":
        detail = (
            " ".join(s.uri for s in event.stored)
            if event.state == "stored"
            else f"{event.reason}: {event.error}".strip(": ")
        )
        return (
            f"{when}  outputs {event.state:<7}  {event.job_id}  "
            f"batch={event.batch_id or '-'}  {detail}"
        ).rstrip()
    latency = "-" if event.latency_s is None else f"{event.latency_s:.1f}s"
    if event.state == "completed":
        detail = event.outputs[0] if event.outputs else ""
        if event.chain_id:
            detail = f"chain={event.chain_id} step={event.step} {detail}"
    else:
        detail = f"{event.reason}: {event.error}".strip(": ")
    return (
        f"{when}  {event.state:<9}  {event.job_id}  batch={event.batch_id or '-'}  "
        f"by={event.resolved_by or '-'}  {latency}  {detail}"
    ).rstrip()


# --- kq status ---------------------------------------------------------------------------


def status_config(settings: Settings) -> StatusConfig:
    """`kq status` / `kq metrics` thresholds the deployment sets (KQ_OUTPUTS_ALERT_AFTER_S)."""
    from worker.snapshot import StatusConfig

    return StatusConfig(outputs_alert_after_s=settings.outputs_alert_after_s)


def cmd_status(args: argparse.Namespace) -> int:
    from kq.ui import render_status
    from worker.admission import Admission
    from worker.status import collect

    settings = Settings.from_env()
    client = _client(settings)

    def snapshot() -> StatusSnapshot:
        return collect(
            client,
            deadline_s=settings.job_deadline_s,
            webhooks_enabled=settings.webhooks_enabled,
            admission=Admission(client, settings),
            config=status_config(settings),
        )

    interval = max(0.2, args.interval)
    try:
        if args.json:
            while True:
                print(json.dumps(snapshot().to_json()), flush=True)
                if not args.watch:
                    return 0
                time.sleep(interval)
        if not args.watch:
            from rich.console import Console

            Console().print(render_status(snapshot()))
            return 0
    except redis.RedisError as exc:
        print(f"kq: Redis unreachable ({type(exc).__name__})", file=sys.stderr)
        return 2
    return _watch(snapshot, render_status, interval)


def _watch(
    snapshot: Callable[[], StatusSnapshot],
    render: Callable[[StatusSnapshot], RenderableType],
    interval: float,
) -> int:
    """Redraw in place until Ctrl-C; a Redis outage is shown, not fatal."""
    from rich.live import Live
    from rich.text import Text

    def frame() -> RenderableType:
        try:
            return render(snapshot())
        except redis.RedisError as exc:
            return Text(f"Redis unreachable ({type(exc).__name__}); retrying", style="bold red")

    with Live(frame(), auto_refresh=False, transient=False) as live:
        while True:
            time.sleep(interval)
            live.update(frame(), refresh=True)


# --- kq metrics ----------------------------------------------------------------------------


def cmd_metrics(args: argparse.Namespace) -> int:
    from worker import telemetry
    from worker.admission import Admission
    from worker.histograms import read_latency
    from worker.metrics import StatusCollector, serve_exporter
    from worker.status import collect

    settings = Settings.from_env()
    client = _client(settings)
    collector = StatusCollector(
        lambda: collect(
            client,
            deadline_s=settings.job_deadline_s,
            webhooks_enabled=settings.webhooks_enabled,
            admission=Admission(client, settings),
            config=status_config(settings),
        ),
        lambda: telemetry.totals(client),
        lambda: read_latency(client),
    )
    serve_exporter(collector, port=args.port, host=args.host)
    print(f"Prometheus metrics on http://{args.host}:{args.port}/metrics", flush=True)
    threading.Event().wait()  # until Ctrl-C / SIGTERM
    return 0


# --- kq dashboard --------------------------------------------------------------------------


def cmd_dashboard(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    token = settings.ops_token
    if len(token) < MIN_OPS_TOKEN_CHARS:
        raise ConfigError(
            "KQ_OPS_TOKEN is not set (or shorter than 16 characters): the dashboard shows "
            "every job, so it needs a token; e.g. export KQ_OPS_TOKEN=$(openssl rand -hex 24)"
        )
    from ops_dashboard.server import serve

    print(
        f"ops dashboard on http://{args.host}:{args.port}/ (log in with KQ_OPS_TOKEN)",
        flush=True,
    )
    serve(settings, token, host=args.host, port=args.port)
    return 0
