"""`kq` commands on jobs already enqueued: job, batch-status, wait, cancel, retry, dlq.
Read commands take `--json` for scripts; human output uses rich."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from rich.table import Table

from kq.producer_views import (
    WAIT_EXIT_CODES,
    batch_exit_code,
    console_for,
    job_dict,
    job_exit_code,
    print_batch_result,
    print_json,
    progress_table,
    show_job,
    wait_batch_live,
)
from kq.ui import make_console
from worker.errors import KqError
from worker.outputs import read_record
from worker.producer import Producer
from worker.runtime import make_producer
from worker.settings import Settings


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add job, batch-status, wait, cancel, retry and dlq to the `kq` parser."""
    p = sub.add_parser("job", help="show one job")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_job)

    p = sub.add_parser("batch-status", help="show a batch's progress, cost and ETA")
    p.add_argument("batch_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_batch_status)

    p = sub.add_parser(
        "wait",
        help="wait until a job or a batch is done",
        description="Wait until a job or every job of a batch is done, then show it.",
        epilog=WAIT_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("id", help="a job id or a batch id")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser("cancel", help="cancel a job, or every unfinished job of a batch")
    p.add_argument("id", help="a job id, or a batch id with --batch")
    p.add_argument("--batch", action="store_true", help="the id is a batch id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("retry", help="enqueue failed or cancelled jobs again as new attempts")
    p.add_argument("job_ids", nargs="+")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser("dlq", help="the dead-letter list of failed jobs")
    dlq = p.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    q = dlq.add_parser("list", help="failed jobs with their reason codes")
    q.add_argument("--reason", help="only this reason code (e.g. provider_failed, deadline)")
    q.add_argument("--limit", type=int, default=100)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_dlq_list)
    q = dlq.add_parser("show", help="one failed job in full")
    q.add_argument("job_id")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_job)
    q = dlq.add_parser("redrive", help="enqueue chosen failed jobs again (idempotent)")
    q.add_argument("job_ids", nargs="*")
    q.add_argument("--reason", help="every failed job with this reason code")
    q.add_argument("--all", action="store_true", help="every job in the list")
    q.add_argument("--limit", type=int, default=1000)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_dlq_redrive)


def cmd_job(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    producer = make_producer(settings)
    job = producer.get_job(args.job_id)
    kept = read_record(producer.store.redis, args.job_id) if job is not None else None
    return show_job(job, args.job_id, as_json=args.json, kept=kept)


def cmd_batch_status(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    progress = make_producer(settings).batch_progress(args.batch_id)
    if progress is None:
        print(f"kq: no batch {args.batch_id!r}", file=sys.stderr)
        return 1
    if args.json:
        print_json(progress.as_dict())
        return 0
    table = progress_table(progress)
    eta = progress.eta_s
    table.caption = f"{progress.rate_per_s:.2f} jobs/s" + (f", ETA {eta:.0f} s" if eta else "")
    make_console().print(table)
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    producer = make_producer(settings)
    if producer.batch_progress(args.id) is not None:
        console = console_for(args.json)
        progress = wait_batch_live(console, producer, args.id, args.timeout)
        if args.json:
            print_json(progress.as_dict() if progress else None)
        else:
            print_batch_result(console, producer, args.id, progress)
        return batch_exit_code(progress)
    job = producer.wait_job(args.id, timeout_s=args.timeout)
    return show_job(job, args.id, as_json=args.json) or job_exit_code(job)


def cmd_cancel(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    producer = make_producer(settings)
    if args.batch:
        if producer.batch_progress(args.id) is None:
            print(f"kq: no batch {args.id!r}", file=sys.stderr)
            return 1
        n = producer.cancel_batch(args.id)
        print_json({"batch_id": args.id, "cancelled": n}) if args.json else print(
            f"cancelled {n} jobs of batch {args.id}"
        )
        return 0
    job = producer.get_job(args.id)
    if job is None:
        print(f"kq: no job {args.id!r}", file=sys.stderr)
        return 1
    done = producer.cancel_job(args.id)
    if args.json:
        print_json({"job_id": args.id, "cancelled": done})
    else:
        print("cancelled" if done else f"not cancelled: the job is already {job.state.value}")
    return 0 if done else 1


def cmd_retry(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    return _redrive(make_producer(settings), args.job_ids, as_json=args.json)


def _redrive(producer: Producer, job_ids: list[str], *, as_json: bool) -> int:
    new_ids = producer.redrive(job_ids)
    skipped = [j for j in job_ids if j not in new_ids]
    if as_json:
        print_json({"redriven": new_ids, "skipped": skipped})
    else:
        for old, new in new_ids.items():
            print(f"{old} -> {new}")
        for job_id in skipped:
            print(f"{job_id}: skipped (unknown, or not failed/cancelled)", file=sys.stderr)
    return 0 if new_ids or not job_ids else 1


def cmd_dlq_list(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    producer = make_producer(settings)
    jobs = producer.dead_letters(limit=args.limit, reason=args.reason)
    if args.json:
        print_json([job_dict(j) for j in jobs])
        return 0
    table = Table(title=f"dead letters ({producer.store.dlq_size()} in all)")
    table.add_column("job", no_wrap=True)
    table.add_column("failed at", no_wrap=True)
    table.add_column("reason")
    table.add_column("error", overflow="fold")
    for job in jobs:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.finished_at))
        table.add_row(job.id, when, job.reason or "-", job.error)
    make_console().print(table)
    return 0


def cmd_dlq_redrive(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    producer = make_producer(settings)
    ids = list(args.job_ids)
    if args.all or args.reason:
        ids += [j.id for j in producer.dead_letters(limit=args.limit, reason=args.reason)]
    if not ids:
        raise KqError("name job ids, or pass --reason CODE or --all")
    return _redrive(producer, ids, as_json=args.json)
