"""`kq forward` and `kq subscribers`: signed outbound webhooks for downstream services.

    kq forward [--consumer NAME] [--since WHEN] [--metrics-port P]   run the forwarder
    kq forward status [--json]                   per endpoint: pending, dead, failing, counts
    kq forward dlq list [SUBSCRIBER] [--json]    parked deliveries
    kq forward dlq replay SUBSCRIBER ID...|--all  queue them again (fresh retry window)
    kq forward dlq purge SUBSCRIBER ID...|--all   forget them
    kq subscribers add ID --url URL [--secret whsec_...] [--batch-prefix P] [--state S]...
    kq subscribers list|remove ID|rotate-secret ID [--keep-old 24h]

The engine is `worker.forward`; this module only parses, wires and prints. Each command
reads the environment once (`Settings.from_env`).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import threading
import time
from dataclasses import asdict
from typing import Any

import redis

from worker.errors import ConfigError, ValidationError
from worker.settings import Settings

DEFAULT_FORWARD_METRICS_PORT = 9809
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add `kq forward` and `kq subscribers` to the `kq` parser."""
    p = sub.add_parser(
        "forward",
        help="deliver result events to subscribers' HTTP endpoints, signed (Standard Webhooks)",
        description="Without a subcommand: run the forwarder until SIGTERM/Ctrl-C. "
        "Subscribers come from `kq subscribers add` and KQ_FORWARD_SUBSCRIBERS_FILE.",
    )
    p.add_argument(
        "--consumer",
        help="this process's name in the kq-forward consumer group (default: the host "
        "name; give each forwarder on one host its own, and reuse it on restart)",
    )
    p.add_argument(
        "--since",
        help="where the kq-forward group starts when it does not exist yet: a stream id, "
        "15m, 2h, an ISO time, 'beginning' or 'now' (default: now)",
    )
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.set_defaults(func=cmd_forward)
    fsub = p.add_subparsers(dest="forward_command", metavar="SUBCOMMAND")

    s = fsub.add_parser("status", help="per endpoint: pending, dead, oldest, failing, counts")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_forward_status)

    dlq = fsub.add_parser("dlq", help="deliveries parked after their retry window")
    dsub = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    d = dsub.add_parser("list", help="list parked deliveries")
    d.add_argument("subscriber", nargs="?", help="one subscriber (default: all)")
    d.add_argument("--limit", type=int, default=100, help="at most this many per subscriber")
    d.add_argument("--json", action="store_true", help="one JSON object per line")
    d.set_defaults(func=cmd_dlq_list)
    for name, helptext in (
        ("replay", "queue parked deliveries again (due now, a fresh retry window)"),
        ("purge", "forget parked deliveries"),
    ):
        d = dsub.add_parser(name, help=helptext)
        d.add_argument("subscriber")
        d.add_argument("event_ids", nargs="*", metavar="EVENT_ID")
        d.add_argument("--all", action="store_true", help="every parked delivery")
        d.set_defaults(func=cmd_dlq_change, action=name)

    p = sub.add_parser("subscribers", help="manage `kq forward` subscribers stored in Redis")
    ssub = p.add_subparsers(dest="subscribers_command", metavar="ACTION", required=True)
    a = ssub.add_parser("add", help="add a subscriber (prints its new secret once)")
    a.add_argument("id", help="a short name: a-z 0-9 _ . - (used in metrics and webhook ids)")
    a.add_argument("--url", required=True, help="the endpoint (http or https)")
    a.add_argument("--secret", help="a whsec_ secret to use (default: a new random one)")
    a.add_argument("--batch-prefix", default="", help="only jobs whose batch id starts so")
    a.add_argument(
        "--state",
        action="append",
        default=[],
        choices=("completed", "failed", "cancelled"),
        help="only these terminal states (repeat; default: all)",
    )
    a.add_argument("--concurrency", type=int, help="attempts in flight to this endpoint")
    a.add_argument("--description", default="")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_subscribers_add)
    lst = ssub.add_parser("list", help="every subscriber (Redis and file), secrets masked")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_subscribers_list)
    r = ssub.add_parser("remove", help="delete a subscriber with its queue and dead list")
    r.add_argument("id")
    r.set_defaults(func=cmd_subscribers_remove)
    r = ssub.add_parser(
        "rotate-secret",
        help="make a new secret current; the old one keeps signing for --keep-old",
    )
    r.add_argument("id")
    r.add_argument("--secret", help="the new whsec_ secret (default: a new random one)")
    r.add_argument(
        "--keep-old",
        default="24h",
        help="how long the old secret(s) keep signing beside the new one: 24h (default), "
        "90m, 3600, or 0 to stop now",
    )
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_subscribers_rotate)


def _client(settings: Settings) -> redis.Redis:
    from worker import runtime

    return runtime.make_redis(settings)


def _store(settings: Settings, client: redis.Redis) -> Any:
    from worker.forward.subscribers import SubscriberStore

    return SubscriberStore(client, settings.forward_subscribers_file)


# --- kq forward (the process) ----------------------------------------------------------


def cmd_forward(args: argparse.Namespace) -> int:
    import socket

    from worker import logs, runtime
    from worker.events import parse_since
    from worker.forward.engine import ForwardConfig, Forwarder
    from worker.forward.health import ROLE

    settings = Settings.from_env()
    logs.configure_logging(settings.log_format, settings.log_level, secrets=settings.secret_values)
    # httpx logs every request with its URL, which may carry a subscriber's token; the
    # forwarder logs its own events, naming the subscriber instead.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        start = parse_since(args.since) if args.since else "$"
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    client = _client(settings)
    store = _store(settings, client)
    config = ForwardConfig.from_settings(
        settings, consumer=args.consumer or socket.gethostname(), start=start
    )
    forwarder = Forwarder(client, store, config)
    stop = threading.Event()

    def _stop(*_: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    heartbeat = runtime.start_heartbeat(ROLE, client)
    if args.metrics_port is not None:
        _serve_metrics(client, store, args.metrics_host, args.metrics_port)
    try:
        forwarder.run(stop)
    finally:
        heartbeat.set()
    return 0


def _serve_metrics(client: redis.Redis, store: Any, host: str, port: int) -> None:
    from worker.forward.health import read_forwarding
    from worker.metrics import ForwardCollector, serve_exporter

    serve_exporter(
        ForwardCollector(lambda: read_forwarding(client, extra=_file_subscribers(store).values())),
        port=port,
        host=host,
    )
    print(f"forward metrics on http://{host}:{port}/metrics", flush=True)


def _file_subscribers(store: Any) -> dict[str, Any]:
    try:
        found: dict[str, Any] = store.from_file()
    except ConfigError:
        return {}
    return found


# --- kq forward status -----------------------------------------------------------------


def cmd_forward_status(args: argparse.Namespace) -> int:
    from worker.alarms import forward_alarms
    from worker.forward.health import read_forwarding
    from worker.snapshot import StatusConfig

    settings = Settings.from_env()
    client = _client(settings)
    store = _store(settings, client)
    try:
        fwd = read_forwarding(client, extra=_file_subscribers(store).values())
    except redis.RedisError as exc:
        print(f"kq: Redis unreachable ({type(exc).__name__})", file=sys.stderr)
        return 2
    alarms = forward_alarms(fwd, StatusConfig())
    if args.json:
        data = asdict(fwd)
        data["alarms"] = [{"name": a.name.value, "message": a.message} for a in alarms]
        print(json.dumps(data))
        return 0
    print(
        f"forwarders: {fwd.forwarders} running; unrouted events: {fwd.unrouted}"
        + (f" (oldest {_age(fwd.oldest_unrouted_s)})" if fwd.oldest_unrouted_s else "")
    )
    if not fwd.endpoints:
        print("no subscribers (add one with `kq subscribers add ID --url URL`)")
    for e in fwd.endpoints:
        failed = sum(n for k, n in e.deliveries.items() if k not in ("delivered", "dead_lettered"))
        line = (
            f"{e.subscriber:<20} pending {e.pending:<6} dead {e.dead:<6} "
            f"oldest {_age(e.oldest_undelivered_s):<8} delivered {e.deliveries['delivered']:<7} "
            f"failed attempts {failed}"
        )
        if e.failing_for_s is not None:
            line += f"  FAILING for {_age(e.failing_for_s)}: {e.last_error or '?'}"
        print(line)
    for a in alarms:
        print(f"ALARM {a.name.value}: {a.message}")
    return 0


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


# --- kq forward dlq ----------------------------------------------------------------------


def cmd_dlq_list(args: argparse.Namespace) -> int:
    from worker.forward.outbox import Outbox

    settings = Settings.from_env()
    client = _client(settings)
    outbox = Outbox(client)
    sids = [args.subscriber] if args.subscriber else sorted(_store(settings, client).all())
    for sid in sids:
        for dead in outbox.dead(sid, limit=max(1, args.limit)):
            if args.json:
                print(json.dumps(dead.to_dict()))
                continue
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(dead.parked_at))
            print(
                f"{sid}  {dead.event_id}  job {dead.job_id or '-'} {dead.state or '-'}  "
                f"parked {when}  after {dead.attempts} attempt(s): {dead.last_error or '-'}"
            )
    return 0


def cmd_dlq_change(args: argparse.Namespace) -> int:
    from worker.forward.outbox import Outbox

    if bool(args.all) == bool(args.event_ids):
        raise ConfigError(f"dlq {args.action}: give EVENT_ID(s) or --all (not both)")
    settings = Settings.from_env()
    client = _client(settings)
    outbox = Outbox(client)
    ids = outbox.dead_ids(args.subscriber) if args.all else list(args.event_ids)
    if args.action == "replay":
        n = outbox.replay(args.subscriber, ids, time.time())
        print(f"{n} delivery(ies) queued again for {args.subscriber}")
    else:
        n = outbox.purge(args.subscriber, ids)
        print(f"{n} delivery(ies) dropped from {args.subscriber}'s dead list")
    return 0


# --- kq subscribers ------------------------------------------------------------------------


def cmd_subscribers_add(args: argparse.Namespace) -> int:
    from worker.forward.outbox import Outbox

    settings = Settings.from_env()
    client = _client(settings)
    sub = _store(settings, client).add(
        args.id,
        args.url,
        secret=args.secret,
        batch_prefix=args.batch_prefix,
        states=args.state,
        concurrency=args.concurrency,
        description=args.description,
    )
    # From now on events are kept for the forwarder, even if it is not running yet.
    Outbox(client).ensure_group("$")
    secret = sub.secrets[0].value
    if args.json:
        print(json.dumps({**sub.public(), "secret": secret}))
    else:
        print(f"subscriber {sub.id} added: {sub.url}")
        if not args.secret:
            print(f"its signing secret (shown once; give it to the receiver): {secret}")
    return 0


def cmd_subscribers_list(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    subs = _store(settings, _client(settings)).all()
    if args.json:
        for sub in subs.values():
            print(json.dumps(sub.public()))
        return 0
    if not subs:
        print("no subscribers")
    for sub in sorted(subs.values(), key=lambda s: s.id):
        info = sub.public()
        filters = []
        if sub.batch_prefix:
            filters.append(f"batch {sub.batch_prefix}*")
        if sub.states:
            filters.append("states " + ",".join(sorted(sub.states)))
        secrets = ", ".join(
            s["hint"] + (f" (until {_utc(s['expires_at'])})" if s["expires_at"] else "")
            for s in info["secrets"]
        )
        print(
            f"{sub.id:<20} {sub.source:<5} {sub.url}  "
            f"[{'; '.join(filters) or 'all events'}]  secrets: {secrets}"
        )
    return 0


def cmd_subscribers_remove(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    pending, dead = _store(settings, _client(settings)).remove(args.id)
    print(f"subscriber {args.id} removed ({pending} pending and {dead} dead deliveries dropped)")
    return 0


def cmd_subscribers_rotate(args: argparse.Namespace) -> int:
    keep = _duration(args.keep_old, "--keep-old")
    settings = Settings.from_env()
    sub = _store(settings, _client(settings)).rotate_secret(
        args.id, secret=args.secret, keep_old_s=keep
    )
    new = sub.secrets[0].value
    old_until = [s.expires_at for s in sub.secrets[1:] if s.expires_at]
    if args.json:
        print(json.dumps({**sub.public(), "secret": new}))
        return 0
    print(f"subscriber {sub.id}: new secret is current" + ("" if args.secret else f": {new}"))
    if old_until:
        print(f"the old one(s) keep signing beside it until {_utc(max(old_until))}")
    else:
        print("the old one(s) no longer sign")
    return 0


def _duration(text: str, name: str) -> float:
    match = _DURATION.match(text.strip())
    if not match:
        raise ValidationError.single(name, f"expected e.g. 24h, 90m, 3600 or 0; got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
