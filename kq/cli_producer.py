"""`kq` subcommands for producers: enqueue, batch, job, batch-status, wait, cancel,
retry, dlq. Read commands take `--json` for scripts; human output uses rich."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kq.ui import make_console, result_table
from worker.domain import EditRequest, Job
from worker.errors import KqError, ValidationError
from worker.producer import BatchProgress, BatchReceipt, Producer
from worker.runtime import make_producer
from worker.settings import Settings

MAX_ERRORS_SHOWN = 20
# A finished batch up to this size is listed job by job; larger ones by outcome.
MAX_ROWS_LISTED = 50


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the producer subcommands to the `kq` parser."""
    p = sub.add_parser("enqueue", help="enqueue one edit")
    p.add_argument("--prompt", required=True, help="the edit instruction")
    p.add_argument("--image", required=True, help="http(s) URL, or a local file to upload")
    p.add_argument("--seed", type=int, help="-1 … 2147483647 (default: random)")
    p.add_argument("--guidance-scale", type=float, help="1.0 … 20.0 (default 3.5)")
    p.add_argument("--aspect-ratio", help="21:9 16:9 4:3 3:2 1:1 2:3 3:4 9:16 9:21")
    p.add_argument("--batch-id", default="")
    p.add_argument("--idempotency-key", help="enqueueing the same key again returns the same job")
    p.add_argument("--wait", action="store_true", help="wait for the result and show it")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_enqueue)

    p = sub.add_parser("batch", help="enqueue a JSONL or CSV file of edits as one batch")
    p.add_argument("file", help="path, or - for standard input")
    p.add_argument("--format", choices=("jsonl", "csv"), help="default: by file extension")
    p.add_argument("--batch-id", help="default: derived from the file, so a re-run resumes")
    p.add_argument("--budget", type=float, help="USD; submitting stops once it would be exceeded")
    p.add_argument("--skip-invalid", action="store_true", help="enqueue the valid lines only")
    p.add_argument("--rejects", type=Path, help="where --skip-invalid writes refused lines")
    p.add_argument("--wait", action="store_true", help="show live progress until all are done")
    p.add_argument("--timeout", type=float, default=24 * 3600.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("api", help="serve the HTTP API for producers (needs KQ_API_TOKEN)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=8)
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("job", help="show one job")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_job)

    p = sub.add_parser("batch-status", help="show a batch's progress, cost and ETA")
    p.add_argument("batch_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_batch_status)

    p = sub.add_parser("wait", help="wait until a job or a batch is done")
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


# --- wiring --------------------------------------------------------------------------


def _console(as_json: bool) -> Console:
    # With --json, stdout carries only JSON; human notes go to stderr.
    return make_console(stderr=as_json)


def _print_json(data: object) -> None:
    print(json.dumps(data, default=str))


def job_dict(job: Job) -> dict[str, Any]:
    data = asdict(job)
    data["state"] = job.state.value
    data["outputs"] = list(job.outputs)
    data["seconds"] = job.seconds
    return data


# --- commands ---------------------------------------------------------------------------


def cmd_enqueue(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    image = args.image
    if not image.startswith(("http://", "https://")):
        image = _upload(settings, Path(image))
    request = EditRequest(
        prompt=args.prompt,
        image=image,
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        aspect_ratio=args.aspect_ratio,
    )
    producer = make_producer(settings)
    job_id = producer.enqueue(request, batch_id=args.batch_id, idempotency_key=args.idempotency_key)
    if not args.wait:
        _print_json({"job_id": job_id}) if args.json else print(job_id)
        return 0
    job = producer.wait_job(job_id, timeout_s=args.timeout)
    return _show_job(job, job_id, as_json=args.json)


def _upload(settings: Settings, path: Path) -> str:
    from worker import runtime

    if not path.is_file():
        raise ValidationError.single(
            "--image", f"expected an http(s) URL or a local image file; {path} does not exist"
        )
    settings.require_provider()
    with runtime.make_provider(settings) as provider:
        url = provider.upload(path)
    print(f"uploaded {path} -> {url}", file=sys.stderr)
    return url


def cmd_api(args: argparse.Namespace) -> int:
    import os

    from producer_api.app import build_from_env
    from worker.errors import ConfigError
    from worker.wsgi_server import serve

    if not os.environ.get("KQ_API_TOKEN"):
        raise ConfigError("KQ_API_TOKEN is not set: the API needs a bearer token to check")
    Settings.from_env()  # fail here, readably, rather than in every gunicorn worker
    print(f"kq api listening on http://{args.host}:{args.port} (docs/openapi.yaml)")
    serve(
        build_from_env, host=args.host, port=args.port, workers=args.workers, threads=args.threads
    )
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    producer = make_producer(Settings.from_env())
    return _show_job(producer.get_job(args.job_id), args.job_id, as_json=args.json)


def _show_job(job: Job | None, job_id: str, *, as_json: bool) -> int:
    if job is None:
        print(f"kq: no job {job_id!r} (unknown, or expired)", file=sys.stderr)
        return 1
    if as_json:
        _print_json(job_dict(job))
        return 0
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in job_dict(job).items():
        if key == "request":
            value = json.dumps(value)
        elif key.endswith("_at") and value:
            value = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(value)))
        table.add_row(key, "" if value in (None, "", ()) else str(value))
    make_console().print(table)
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from worker.batchfile import BatchFile

    console = _console(args.json)
    producer = make_producer(Settings.from_env())
    with BatchFile(args.file, args.format) as batch_file:
        scan = batch_file.scan()
        if scan.invalid and not args.skip_invalid:
            console.print(
                f"[red]{args.file}: {scan.invalid} of {scan.lines} lines are invalid; "
                "nothing was enqueued.[/red] Fix them, or pass --skip-invalid."
            )
            for error in scan.errors[:MAX_ERRORS_SHOWN]:
                console.print(f"  {error}")
            if scan.invalid > MAX_ERRORS_SHOWN:
                console.print(f"  ... and {scan.invalid - MAX_ERRORS_SHOWN} more")
            return 2
        if scan.valid == 0:
            console.print(f"[red]{args.file}: no valid edit requests; nothing was enqueued[/red]")
            return 2
        skip: frozenset[int] = frozenset()
        if scan.invalid:
            rejects = args.rejects or Path(f"{args.file}.rejects.jsonl")
            if args.file == "-":
                rejects = args.rejects or Path("stdin.rejects.jsonl")
            with rejects.open("w", encoding="utf-8") as out:
                for error in scan.errors:
                    out.write(json.dumps(error.as_dict()) + "\n")
            skip = frozenset(e.line for e in scan.errors)
            console.print(
                f"[yellow]{scan.invalid} invalid lines skipped; reasons in {rejects}[/yellow]"
            )
        batch_id = args.batch_id or batch_file.default_batch_id
        receipt = _enqueue_with_progress(
            console, producer, batch_file.items(batch_id, skip=skip), batch_id, scan.valid,
            args.budget,
        )  # fmt: skip
    console.print(
        f"batch [bold]{receipt.batch_id}[/bold]: {receipt.created} new jobs, "
        f"{receipt.existing} already enqueued before"
        + (f" ({receipt.resent} of those still queued, sent again)" if receipt.resent else "")
    )
    if not args.wait:
        if args.json:
            _print_json(asdict(receipt))
        return 0
    progress = _wait_batch_live(console, producer, receipt.batch_id, args.timeout)
    if args.json:
        _print_json(progress.as_dict() if progress else None)
    else:
        _print_batch_result(console, producer, receipt.batch_id, progress)
    return 0 if progress is not None and progress.done else 1


def _enqueue_with_progress(
    console: Console,
    producer: Producer,
    items: Any,
    batch_id: str,
    total: int,
    budget: float | None,
) -> BatchReceipt:
    with Progress(
        TextColumn("[bold]enqueue"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=total < 5000,
    ) as progress:
        task = progress.add_task("enqueue", total=total)
        return producer.enqueue_batch(
            items,
            batch_id=batch_id,
            budget_usd=budget,
            on_chunk=lambda r: progress.update(task, completed=r.total),
        )


def _wait_batch_live(
    console: Console, producer: Producer, batch_id: str, timeout_s: float
) -> BatchProgress | None:
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("edits", total=None, detail="")

        def show(p: BatchProgress) -> None:
            eta = p.eta_s
            bar.update(
                task,
                total=p.total,
                completed=p.terminal,
                detail=(
                    f"{p.completed} ok, {p.failed} failed, {p.cancelled} cancelled, "
                    f"{p.in_flight} at provider, {p.queued} queued · ${p.cost_usd:.2f}"
                    + (f" · ETA {eta:.0f}s" if eta else "")
                ),
            )

        return producer.wait_batch(batch_id, timeout_s=timeout_s, on_progress=show)


def _print_batch_result(
    console: Console, producer: Producer, batch_id: str, progress: BatchProgress | None
) -> None:
    if progress is None:
        console.print(f"no batch {batch_id!r}")
        return
    if progress.total <= MAX_ROWS_LISTED:
        jobs = producer.batch_jobs(batch_id, limit=MAX_ROWS_LISTED)
        console.print(result_table([j.id for j in jobs], jobs))
    else:
        console.print(_outcome_table(producer, batch_id))
    console.print(_progress_table(progress))


def _outcome_table(producer: Producer, batch_id: str) -> Table:
    """A large batch, summarised by state and reason."""
    counts: dict[tuple[str, str], int] = {}
    offset = 0
    while jobs := producer.batch_jobs(batch_id, offset=offset, limit=1000):
        for job in jobs:
            key = (job.state.value, job.reason)
            counts[key] = counts.get(key, 0) + 1
        offset += len(jobs)
    table = Table(title=f"batch {batch_id} by outcome")
    table.add_column("state")
    table.add_column("reason")
    table.add_column("jobs", justify="right")
    for (state, reason), n in sorted(counts.items(), key=lambda kv: -kv[1]):
        table.add_row(state, reason or "-", str(n))
    return table


def _progress_table(p: BatchProgress) -> Table:
    table = Table(title=f"batch {p.batch_id}")
    for name in ("total", "queued", "in flight", "completed", "failed", "cancelled", "cost"):
        table.add_column(name, justify="right")
    table.add_row(
        str(p.total),
        str(p.queued),
        str(p.in_flight),
        str(p.completed),
        str(p.failed),
        str(p.cancelled),
        f"${p.cost_usd:.2f}" + (f" of ${p.budget_usd:.2f}" if p.budget_usd is not None else ""),
    )
    return table


def cmd_batch_status(args: argparse.Namespace) -> int:
    progress = make_producer(Settings.from_env()).batch_progress(args.batch_id)
    if progress is None:
        print(f"kq: no batch {args.batch_id!r}", file=sys.stderr)
        return 1
    if args.json:
        _print_json(progress.as_dict())
        return 0
    table = _progress_table(progress)
    eta = progress.eta_s
    table.caption = f"{progress.rate_per_s:.2f} jobs/s" + (f", ETA {eta:.0f} s" if eta else "")
    make_console().print(table)
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    producer = make_producer(Settings.from_env())
    if producer.batch_progress(args.id) is not None:
        console = _console(args.json)
        progress = _wait_batch_live(console, producer, args.id, args.timeout)
        if args.json:
            _print_json(progress.as_dict() if progress else None)
        else:
            _print_batch_result(console, producer, args.id, progress)
        return 0 if progress is not None and progress.done else 1
    job = producer.wait_job(args.id, timeout_s=args.timeout)
    code = _show_job(job, args.id, as_json=args.json)
    return code if code or (job is not None and job.terminal) else 1


def cmd_cancel(args: argparse.Namespace) -> int:
    producer = make_producer(Settings.from_env())
    if args.batch:
        if producer.batch_progress(args.id) is None:
            print(f"kq: no batch {args.id!r}", file=sys.stderr)
            return 1
        n = producer.cancel_batch(args.id)
        _print_json({"batch_id": args.id, "cancelled": n}) if args.json else print(
            f"cancelled {n} jobs of batch {args.id}"
        )
        return 0
    job = producer.get_job(args.id)
    if job is None:
        print(f"kq: no job {args.id!r}", file=sys.stderr)
        return 1
    done = producer.cancel_job(args.id)
    if args.json:
        _print_json({"job_id": args.id, "cancelled": done})
    else:
        print("cancelled" if done else f"not cancelled: the job is already {job.state.value}")
    return 0 if done else 1


def cmd_retry(args: argparse.Namespace) -> int:
    return _redrive(make_producer(Settings.from_env()), args.job_ids, as_json=args.json)


def _redrive(producer: Producer, job_ids: list[str], *, as_json: bool) -> int:
    new_ids = producer.redrive(job_ids)
    skipped = [j for j in job_ids if j not in new_ids]
    if as_json:
        _print_json({"redriven": new_ids, "skipped": skipped})
    else:
        for old, new in new_ids.items():
            print(f"{old} -> {new}")
        for job_id in skipped:
            print(f"{job_id}: skipped (unknown, or not failed/cancelled)", file=sys.stderr)
    return 0 if new_ids or not job_ids else 1


def cmd_dlq_list(args: argparse.Namespace) -> int:
    producer = make_producer(Settings.from_env())
    jobs = producer.dead_letters(limit=args.limit, reason=args.reason)
    if args.json:
        _print_json([job_dict(j) for j in jobs])
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
    producer = make_producer(Settings.from_env())
    ids = list(args.job_ids)
    if args.all or args.reason:
        ids += [j.id for j in producer.dead_letters(limit=args.limit, reason=args.reason)]
    if not ids:
        raise KqError("name job ids, or pass --reason CODE or --all")
    return _redrive(producer, ids, as_json=args.json)
