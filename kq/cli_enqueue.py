"""`kq` commands that put edits in: enqueue (one edit), batch (a JSONL or CSV file) and
api (the same over HTTP, for producers elsewhere)."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kq.producer_views import (
    EXIT_INVALID,
    WAIT_EXIT_CODES,
    batch_exit_code,
    console_for,
    job_exit_code,
    print_batch_result,
    print_json,
    show_job,
    wait_batch_live,
)
from worker.domain import MODEL, EditRequest
from worker.errors import ValidationError
from worker.models import known_models, lookup
from worker.producer import BatchReceipt, Producer
from worker.runtime import make_producer
from worker.settings import Settings

MAX_ERRORS_SHOWN = 20


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add enqueue, batch and api to the `kq` parser."""
    p = sub.add_parser(
        "enqueue",
        help="enqueue one edit",
        description="Enqueue one edit; prints its job id (with --wait: the finished job).",
        epilog=WAIT_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--prompt", required=True, help="the edit instruction")
    p.add_argument(
        "--image",
        required=True,
        action="append",
        help="http(s) URL, or a local file to upload (repeat for a multi-image model)",
    )
    p.add_argument(
        "--model",
        default=MODEL,
        help=f"one of {known_models()} (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, help="-1 … 2147483647 (default: random)")
    p.add_argument("--guidance-scale", type=float, help="1.0 … 20.0 (default 3.5)")
    p.add_argument("--aspect-ratio", help="21:9 16:9 4:3 3:2 1:1 2:3 3:4 9:16 9:21")
    p.add_argument("--batch-id", default="")
    p.add_argument("--idempotency-key", help="enqueueing the same key again returns the same job")
    p.add_argument(
        "--metadata",
        help="a JSON object of your own (up to 4 KiB), kept on the job and in its result "
        "event, e.g. '{\"order\": 17}'",
    )
    p.add_argument("--wait", action="store_true", help="wait for the result and show it")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_enqueue)

    p = sub.add_parser(
        "batch",
        help="enqueue a JSONL or CSV file of edits as one batch",
        description="Enqueue a JSONL or CSV file (UTF-8, a byte-order mark is fine) as one "
        "batch. Every line is checked before anything is enqueued.",
        epilog=WAIT_EXIT_CODES + "\n(without --wait: 0 once enqueued, 2 for invalid input)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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


def cmd_enqueue(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    images = tuple(
        image if image.startswith(("http://", "https://")) else _upload(settings, Path(image))
        for image in args.image
    )
    multi = (spec := lookup(args.model)) is not None and spec.multi
    request = EditRequest(
        prompt=args.prompt,
        # A single-image model given several --image gets them all, and says it takes one.
        image=None if multi else images[0],
        images=images if multi or len(images) > 1 else None,
        model=args.model,
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        aspect_ratio=args.aspect_ratio,
    )
    metadata = _metadata(args.metadata)
    producer = make_producer(settings)
    job_id = producer.enqueue(
        request,
        batch_id=args.batch_id,
        idempotency_key=args.idempotency_key,
        metadata=metadata,
    )
    if not args.wait:
        print_json({"job_id": job_id}) if args.json else print(job_id)
        return 0
    job = producer.wait_job(job_id, timeout_s=args.timeout)
    return show_job(job, job_id, as_json=args.json) or job_exit_code(job)


def _metadata(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ValidationError.single("--metadata", f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValidationError.single("--metadata", 'expected a JSON object, e.g. {"order": 17}')
    return value


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
    from producer_api.app import build
    from worker.errors import ConfigError
    from worker.wsgi_server import serve

    settings = Settings.from_env()  # here, readably, rather than in every gunicorn worker
    if not settings.api_token:
        raise ConfigError("KQ_API_TOKEN is not set: the API needs a bearer token to check")
    print(f"kq api listening on http://{args.host}:{args.port} (docs/openapi.yaml)")
    serve(
        lambda: build(settings),
        host=args.host,
        port=args.port,
        workers=args.workers,
        threads=args.threads,
        json_errors=True,
    )
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from worker.batchfile import BatchFile

    console = console_for(args.json)
    settings = Settings.from_env()
    producer = _enqueueing_producer(settings)
    with BatchFile(args.file, args.format) as batch_file, _gc_frozen():
        scan = batch_file.scan()
        gc.freeze()  # the scan's checked lines too
        if scan.invalid and not args.skip_invalid:
            console.print(
                f"[red]{args.file}: {scan.invalid} of {scan.lines} lines are invalid; "
                "nothing was enqueued.[/red] Fix them, or pass --skip-invalid."
            )
            for error in scan.errors[:MAX_ERRORS_SHOWN]:
                console.print(f"  {error}")
            if scan.invalid > MAX_ERRORS_SHOWN:
                console.print(f"  ... and {scan.invalid - MAX_ERRORS_SHOWN} more")
            return EXIT_INVALID
        if scan.valid == 0:
            console.print(f"[red]{args.file}: no valid edit requests; nothing was enqueued[/red]")
            return EXIT_INVALID
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
            print_json(receipt.as_dict())
        return 0
    progress = wait_batch_live(console, producer, receipt.batch_id, args.timeout)
    if args.json:
        print_json(progress.as_dict() if progress else None)
    else:
        print_batch_result(console, producer, receipt.batch_id, progress)
    return batch_exit_code(progress)


@contextmanager
def _gc_frozen() -> Iterator[None]:
    """What the process holds when this starts (the modules), and what is frozen within,
    is left out of the cyclic GC's collections until it ends: a batch's long-lived data
    (a scan's checked lines) has no reference cycles, and the full collections walked it
    again and again (0.2 s of a 100,000-line batch)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _enqueueing_producer(settings: Settings) -> Producer:
    """A Producer for enqueueing and reading back only: Redis and the submit queue, without
    the provider client `make_producer` adds for cancels (whose TLS set-up alone is a
    fifth of a second of a 100,000-line `kq batch`)."""
    from worker.celery_app import configure
    from worker.runtime import make_store

    configure(settings)
    return Producer(store=make_store(settings), send=_send_submits)


def _send_submits(job_ids: list[str]) -> None:
    """`worker.tasks.enqueue_submits` (the same `kq.submit_chunk` messages), with a
    chunk's messages sent in one round trip by kombu's publish batch where the transport
    has one (Redis), not one each: a 100,000-line batch sends 1,000 of them."""
    from kombu.exceptions import KombuError

    from worker.celery_app import app
    from worker.errors import QueueUnavailable
    from worker.tasks import enqueue_submits, publish_chunks

    if len(job_ids) < 2:
        enqueue_submits(job_ids)
        return
    try:
        with app.producer_or_acquire() as producer:
            # Older kombu (before 5.7) has no publish batch: each message is sent alone.
            batch = producer.batch() if hasattr(producer, "batch") else nullcontext()
            with batch:
                publish_chunks(job_ids, producer)
    except KombuError as exc:  # OperationalError, or a batch whose delivery is uncertain
        raise QueueUnavailable(f"broker unreachable ({type(exc).__name__})") from exc


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
