"""`kq`: the command line. Each subcommand reads the environment once and hands
Settings down; long-running ones (worker, beat, receiver, sim, up) run in the foreground.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import structlog

from worker.errors import ConfigError, KqError, ValidationError
from worker.settings import STACK_ENV_FILE, Settings

log = structlog.get_logger("kq.cli")


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "sim":
        from wavespeed_sim.cli import main as sim_main

        return sim_main(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        return int(args.func(args))
    except ValidationError as exc:
        print(f"kq: invalid input: {exc}", file=sys.stderr)
        return 2
    except (ConfigError, KqError) as exc:
        print(f"kq: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kq", description="Bulk FLUX.1 Kontext [max] edits on WaveSpeed, via Celery and Redis."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="start the whole local stack in the foreground (Ctrl-C stops it)")
    p.add_argument("--var-dir", type=Path, default=Path("var"))
    p.add_argument("--concurrency", type=int, default=8, help="worker threads")
    p.add_argument("--no-webhooks", action="store_true", help="poll-only mode")
    p.add_argument("--sim-arg", action="append", default=[], help="extra `kq sim` argument")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("run", help="start the stack, process a JSONL file of edits, show results")
    p.add_argument("file", nargs="?", type=Path, default=Path("examples/edits.jsonl"))
    p.add_argument("--var-dir", type=Path, default=Path("var"))
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for all jobs")
    p.add_argument("--concurrency", type=int, default=8, help="worker threads")
    p.add_argument(
        "--drop-webhooks",
        type=float,
        default=0.3,
        help="simulator only: share of webhook deliveries dropped, to show the poll path",
    )
    p.add_argument("--json", action="store_true", help="print results as JSON lines")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("worker", help="run a Celery worker (submits jobs, runs polling sweeps)")
    p.add_argument("--concurrency", type=int, default=8, help="threads (I/O-bound work)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("beat", help="run the scheduler that triggers the polling sweep")
    p.set_defaults(func=cmd_beat)

    p = sub.add_parser("receiver", help="serve the webhook receiver under gunicorn")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--workers", type=_at_least_one, default=2, help="processes (default 2)")
    p.add_argument(
        "--worker-class",
        choices=("gevent", "gthread"),
        default="gevent",
        help="gunicorn worker: gevent (default; a greenlet per connection) or gthread",
    )
    p.add_argument(
        "--connections",
        type=_at_least_one,
        default=1000,
        help="gevent: connections a process serves at once (default 1000)",
    )
    p.add_argument(
        "--threads", type=_at_least_one, default=8, help="gthread: threads a process (default 8)"
    )
    p.set_defaults(func=cmd_receiver)

    sub.add_parser("sim", help="run the local WaveSpeed simulator (see `kq sim --help`)")

    from kq import cli_producer

    cli_producer.register(sub)

    from kq import cli_ops

    cli_ops.register(sub)

    from kq import cli_forward

    cli_forward.register(sub)
    return parser


# --- long-running processes ----------------------------------------------------


def _at_least_one(text: str) -> int:
    """argparse type: a whole number, 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    return value


def _process_settings(*, nonblocking_stderr: bool = False) -> Settings:
    """This process's settings, its logging configured on them; with `nonblocking_stderr`
    its standard error first made a queue that never blocks it (worker/log_sink.py)."""
    from worker import log_sink, logs

    settings = Settings.from_env()
    if nonblocking_stderr:
        log_sink.install(json_lines=settings.log_format == "json")
    logs.configure_logging(settings.log_format, settings.log_level, secrets=settings.secret_values)
    return settings


def _announce_mode(settings: Settings) -> None:
    if settings.webhooks_enabled:
        log.info("mode.webhooks", receiver=settings.webhook_public_url)
    else:
        log.warning(
            "mode.poll_only",
            detail="KQ_WEBHOOK_PUBLIC_URL is not set: submitting without a webhook; "
            "results arrive by polling",
            poll_after_s=settings.poll_after_s,
        )


def cmd_worker(args: argparse.Namespace) -> int:
    from celery.signals import worker_init, worker_ready, worker_shutdown, worker_shutting_down

    from worker import runtime
    from worker.celery_app import POLL_QUEUE, SUBMIT_QUEUE, configure

    settings = _process_settings()
    settings.require_provider()
    _announce_mode(settings)
    app = configure(settings)
    stop_events = []
    seen: dict[str, object] = {}

    from worker import dispatcher, tasks

    deps = runtime.make_deps(settings, tasks.enqueue_submit)
    tasks.install(deps)

    @worker_init.connect(weak=False)
    def _init(sender: object = None, **_: object) -> None:
        seen["worker"] = sender

    @worker_shutting_down.connect(weak=False)
    def _signalled(sig: object = None, **_: object) -> None:
        # Sent only from Celery's SIGTERM/SIGINT/SIGQUIT handlers: a stop we were asked for.
        seen["signal"] = sig
        # Celery stops consuming and waits for the tasks running; we stop claiming waiting
        # jobs, hand back the chunks' unstarted ones, and bound the wait (KQ_DRAIN_TIMEOUT_S).
        for event in dispatcher_stops:
            event.set()
        if not tasks.draining():
            tasks.drain(settings.drain_timeout_s, _drain_timed_out)

    def _drain_timed_out() -> None:
        log.warning("worker.drain_timeout", drain_timeout_s=settings.drain_timeout_s)
        sys.stdout.flush()
        sys.stderr.flush()
        # Every submit still running was recorded `submitting` before its POST: it is
        # settled as an ambiguous submit, never paid twice. Messages still held come back
        # after the visibility timeout; the poller resends their queued jobs sooner.
        os._exit(0)

    dispatcher_stops: list[threading.Event] = []

    @worker_ready.connect(weak=False)
    def _ready(**_: object) -> None:
        stop_events.append(runtime.start_heartbeat("worker", deps.store.redis))
        dispatcher_stops.append(
            dispatcher.start(deps, tasks.submit_pool(), tasks.retry_submit_later)
        )
        stop_events.extend(dispatcher_stops)

    @worker_shutdown.connect(weak=False)
    def _shutdown(**_: object) -> None:
        for event in stop_events:
            event.set()

    try:
        app.worker_main(
            [
                "worker",
                "--pool=threads",
                f"--concurrency={args.concurrency}",
                "--loglevel=INFO",
                f"--queues={POLL_QUEUE},{SUBMIT_QUEUE}",
                f"--hostname=kq@{socket.gethostname()}-{os.getpid()}",
                "--without-gossip",
                "--without-mingle",
            ]
        )
    except Exception as exc:
        log.critical("worker.crashed", error=repr(exc), exc_info=True)
        return 1
    return worker_exit_code(seen.get("worker"), seen.get("signal"))


def worker_exit_code(worker: object, stop_signal: object) -> int:
    """What `kq worker` exits with once Celery's worker has returned.

    `app.worker_main` returns nothing, whatever happened; the WorkController knows its
    `exitcode` (EX_FAILURE after an "Unrecoverable error", also after SIGINT). A worker
    stopped by a signal exits 0; one that stopped on its own crashed — it is meant to
    run until told otherwise — and exits non-zero, so a supervisor sees it.
    """
    code = getattr(worker, "exitcode", None)
    if stop_signal is not None:
        return 0 if stop_signal in ("SIGTERM", "SIGINT") else int(code or 0)
    log.critical("worker.stopped_unasked", exitcode=code)
    return int(code) if isinstance(code, int) and code != 0 else 1


def cmd_beat(args: argparse.Namespace) -> int:
    from celery.signals import beat_init

    from worker import runtime
    from worker.celery_app import configure

    settings = _process_settings()
    app = configure(settings)

    @beat_init.connect(weak=False)
    def _ready(**_: object) -> None:
        runtime.start_heartbeat("beat", runtime.make_redis(settings))

    app.Beat(loglevel="INFO", quiet=True).run()
    return 0


def cmd_receiver(args: argparse.Namespace) -> int:
    if args.worker_class == "gevent":
        from gevent import monkey

        if not monkey.is_module_patched("socket"):
            # gevent must patch the standard library before anything imports `ssl`, and
            # this process has (structlog): start again in one that patches first.
            argv = ["receiver", "--host", args.host, "--port", str(args.port)]
            argv += ["--workers", str(args.workers), "--worker-class", "gevent"]
            argv += ["--connections", str(args.connections)]
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(sys.executable, [sys.executable, "-m", "kq.gevent_main", *argv])  # noqa: S606
    from webhook_receiver.server import serve

    # A stalled reader of its standard error must not stop the receiver (under gevent,
    # a blocked write would stop every delivery of the process): see worker/log_sink.py.
    settings = _process_settings(nonblocking_stderr=True)
    settings.require_secret_key()  # it checks the per-job token of every webhook
    serve(
        settings,
        host=args.host,
        port=args.port,
        workers=args.workers,
        threads=args.threads,
        worker_class=args.worker_class,
        connections=args.connections,
    )
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from kq.stack import Stack, StackConfig

    # What the user set; the stack starts Redis and creates a secret key for what is not.
    user = Settings.from_env(local_stack=True)
    config = StackConfig(
        var_dir=args.var_dir,
        redis_url=user.redis_url or None,
        wavespeed_api_key=user.wavespeed_api_key or None,
        wavespeed_base_url=user.wavespeed_base_url,
        sim_args=tuple(args.sim_arg),
        webhooks=not args.no_webhooks,
        worker_concurrency=args.concurrency,
        extra_env=_sim_friendly_env(user),
        keep_outputs=True,  # into var/outputs unless KQ_OUTPUTS says otherwise
    )
    with Stack(config) as stack:
        env_file = _write_stack_env(args.var_dir, stack.env)
        print(f"stack ready; `kq enqueue` and `kq job` in this folder use it ({env_file}).")
        print("Ctrl-C stops everything.")
        try:
            stack.wait_forever()
        finally:
            env_file.unlink(missing_ok=True)
    return 0


def _sim_friendly_env(user: Settings) -> dict[str, str]:
    """Against the simulator, poll silent jobs after 10 s instead of production's 120 s."""
    if user.wavespeed_api_key or "KQ_POLL_AFTER_S" in user.set_in_env:
        return {}
    return {"KQ_POLL_AFTER_S": "10"}


def _write_stack_env(var_dir: Path, env: dict[str, str]) -> Path:
    path = var_dir / STACK_ENV_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{k}={v}" for k, v in sorted(env.items()) if k.startswith(("KQ_", "WAVESPEED_"))]
    path.write_text("# written by `kq up`; removed when it stops\n" + "\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def cmd_run(args: argparse.Namespace) -> int:
    from kq.run import run_file

    return run_file(
        args.file,
        var_dir=args.var_dir,
        timeout_s=args.timeout,
        concurrency=args.concurrency,
        drop_webhooks=args.drop_webhooks,
        as_json=args.json,
    )


if __name__ == "__main__":
    sys.exit(main())
