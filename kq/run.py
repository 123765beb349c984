"""`kq run FILE`: start the local stack, process a JSONL file of edits, show the results.

The file is validated completely before anything starts, so a bad line costs
nothing. Against the simulator, some webhook deliveries are dropped on purpose so
that both result paths (webhook and poll) show in the summary.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kq.ui import make_console, result_table
from worker.chains import ChainItem, chain_from_dict, is_chain
from worker.domain import EditRequest, Job, summary_line
from worker.errors import FieldError, ValidationError
from worker.outputs import OutputsRecord, read_record
from worker.producer import Producer
from worker.settings import Settings

# Simulator settings for the demo: quick, seeded, with a few failures and lost webhooks.
DEMO_SIM_ARGS = (
    "--seed", "7",
    "--queue-delay", "0.3",
    "--inference-time", "1.5",
    "--fail-rate", "0.1",
    "--fail-codes", "1200,5000",
)  # fmt: skip
# Against the simulator a silent job is polled after 3 s (production default: 120 s).
DEMO_ENV = {"KQ_POLL_AFTER_S": "3", "KQ_SWEEP_INTERVAL_S": "1"}
MAX_ERRORS_SHOWN = 20
# How long `kq run` waits for the copy-out of the last results before it stops the stack.
OUTPUTS_WAIT_S = 60.0


def read_requests(path: Path) -> list[EditRequest | ChainItem]:
    """Parse and validate a JSONL file of edits and chains of edits (lines with `steps`);
    raises ValidationError listing line and field."""
    if not path.exists():
        raise ValidationError.single("FILE", f"{path} does not exist")
    requests: list[EditRequest | ChainItem] = []
    errors: list[FieldError] = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                data = json.loads(text)
                requests.append(
                    chain_from_dict(data) if is_chain(data) else EditRequest.from_dict(data)
                )
            except json.JSONDecodeError as exc:
                errors.append(FieldError(f"line {number}", f"not valid JSON ({exc.msg})"))
            except ValidationError as exc:
                errors.extend(
                    FieldError(f"line {number}: {e.field}", e.message) for e in exc.errors
                )
    if errors:
        raise ValidationError(errors)
    if not requests:
        raise ValidationError.single("FILE", f"{path} holds no edit requests")
    return requests


def run_file(
    path: Path,
    *,
    var_dir: Path,
    timeout_s: float,
    concurrency: int,
    drop_webhooks: float,
    as_json: bool = False,
) -> int:
    from kq.stack import Stack, StackConfig, signals_as_keyboard_interrupt
    from worker import runtime
    from worker.celery_app import configure
    from worker.tasks import enqueue_submits

    console = make_console(stderr=as_json)
    try:
        requests = read_requests(path)
    except ValidationError as exc:
        console.print(f"[red]{path}: nothing was enqueued; fix these lines first:[/red]")
        for error in exc.errors[:MAX_ERRORS_SHOWN]:
            console.print(f"  {error}")
        if len(exc.errors) > MAX_ERRORS_SHOWN:
            console.print(f"  ... and {len(exc.errors) - MAX_ERRORS_SHOWN} more")
        return 2

    # What the user set; the stack starts Redis and creates a secret key for what is not.
    user = Settings.from_env(local_stack=True)
    api_key = user.wavespeed_api_key or None
    config = StackConfig(
        var_dir=var_dir,
        redis_url=user.redis_url or None,
        wavespeed_api_key=api_key,
        wavespeed_base_url=user.wavespeed_base_url,
        sim_args=() if api_key else (*DEMO_SIM_ARGS, "--drop-webhook-rate", str(drop_webhooks)),
        worker_concurrency=concurrency,
        extra_env={} if api_key else DEMO_ENV,
        # The demo runs on one machine: WaveSpeed itself cannot reach a local receiver.
        webhooks=not api_key or user.webhooks_enabled,
        keep_outputs=True,  # into var/outputs unless KQ_OUTPUTS says otherwise
    )
    chains = [r for r in requests if isinstance(r, ChainItem)]
    described = f"{len(requests) - len(chains)} edits" + (
        f" and {len(chains)} chains of edits" if chains else ""
    )
    console.print(f"[bold]kq run[/bold]: {described} from {path}")
    stack = Stack(config, announce=lambda line: console.print(f"  {line}"))
    # Ctrl-C or SIGTERM mid-run still stops every process the stack started.
    with signals_as_keyboard_interrupt(), stack:
        settings = stack.child_settings()
        configure(settings)
        producer = Producer(store=runtime.make_store(settings), send=enqueue_submits)
        started = time.monotonic()
        receipt = producer.enqueue_batch(requests, batch_id=f"run-{int(time.time())}")
        job_ids, jobs = _wait_with_progress(console, producer, receipt.batch_id, timeout_s)
        elapsed = time.monotonic() - started
        # Simulator outputs vanish with the simulator, and real ones after 7 days: the
        # stack's copy-out (KQ_OUTPUTS, var/outputs by default) keeps them.
        records = wait_for_outputs(producer.store.redis, jobs, OUTPUTS_WAIT_S)
        saved = local_copies(records)
        chain_lines = [_chain_line(producer, item.chain_id, saved) for item in chains]
        _print_outputs(console, records, settings.outputs_url)
        console.print(f"  logs of every process: {var_dir / 'logs'}")
    counts = tally(jobs)
    if as_json:
        for job_id, job in zip(job_ids, jobs, strict=True):
            print(json.dumps(_job_row(job_id, job, records.get(job_id))))
    else:
        console.print(result_table(job_ids, jobs, saved))
        for line in chain_lines:
            console.print(line)
        console.print(f"finished in {elapsed:.1f} s")
    print(summary_line(counts))
    return 0 if counts.get("pending", 0) == 0 else 1


def _wait_with_progress(
    console: Console, producer: Producer, batch_id: str, timeout_s: float
) -> tuple[list[str], list[Job | None]]:
    """Wait for every job of the batch, the chain steps written along the way included
    (the batch's job list grows as steps complete)."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    deadline = time.monotonic() + timeout_s
    with progress:
        task = progress.add_task("edits", total=None, detail="")
        while True:
            job_ids = producer.store.batch_members(batch_id)
            jobs = producer.get_jobs(job_ids)
            c = tally(jobs)
            detail = (
                f"{c['completed']} completed, {c['failed']} failed, "
                f"{c['in_flight']} at provider, {c['queued']} queued"
            )
            done = c["completed"] + c["failed"] + c["cancelled"]
            progress.update(task, total=len(job_ids), completed=done, detail=detail)
            # All terminal, and no step written meanwhile (a step is written by the move
            # that ends the one before it, so none can come after this).
            settled = done == len(job_ids) and len(producer.store.batch_members(batch_id)) == done
            if settled or time.monotonic() >= deadline:
                return job_ids, jobs
            time.sleep(0.25)


def _chain_line(producer: Producer, chain_id: str, saved: Mapping[str, Path]) -> str:
    chain = producer.get_chain(chain_id)
    if chain is None:
        return f"chain {chain_id[:8]}: missing"
    colour = {"completed": "green", "failed": "red", "cancelled": "yellow"}.get(chain.state, "cyan")
    ends = []
    for end in chain.ends:
        shown = str(saved.get(end.job_id) or (end.outputs[0] if end.outputs else end.reason))
        ends.append(f"branch {end.branch} {end.state} at step {end.step}: {shown}")
    return (
        f"chain {chain_id[:8]}: [{colour}]{chain.state}[/], {chain.steps} steps, "
        f"{len(chain.job_ids)} jobs; " + "; ".join(ends)
    )


def tally(jobs: Sequence[Job | None]) -> Counter[str]:
    """Counts by state and by result path (for the progress line and the summary)."""
    counts: Counter[str] = Counter(
        completed=0, failed=0, cancelled=0, webhook=0, poll=0, pending=0, in_flight=0, queued=0
    )
    for job in jobs:
        if job is None or not job.terminal:
            counts["pending"] += 1
            if job is not None and job.state.value in ("submitting", "submitted"):
                counts["in_flight"] += 1
            else:
                counts["queued"] += 1
            continue
        counts[job.state.value] += 1
        if job.resolved_by in ("webhook", "poll"):
            counts[job.resolved_by] += 1
    return counts


def _job_row(job_id: str, job: Job | None, kept: OutputsRecord | None) -> dict[str, object]:
    if job is None:
        return {"job_id": job_id, "state": "missing"}
    return {
        "job_id": job_id,
        "state": job.state.value,
        "outputs": list(job.outputs),
        "stored_outputs": [] if kept is None else [c.uri for c in kept.stored],
        "reason": job.reason,
        "error": job.error,
        "resolved_by": job.resolved_by,
        "seconds": job.seconds,
        "prediction_id": job.prediction_id,
    }


def wait_for_outputs(
    client: redis.Redis, jobs: Sequence[Job | None], timeout_s: float
) -> dict[str, OutputsRecord]:
    """Job id -> its copy-out, for the completed jobs whose outputs are kept, once each
    one has settled (stored or failed) or `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    wanted = [j.id for j in jobs if j is not None and j.outputs]
    found: dict[str, OutputsRecord] = {}
    while True:
        for job_id in wanted:
            if job_id not in found or not found[job_id].settled:
                record = read_record(client, job_id)
                if record is not None:
                    found[job_id] = record
        waiting = [j for j in wanted if j in found and not found[j].settled]
        if not waiting or time.monotonic() >= deadline:
            return found
        time.sleep(0.2)


def local_copies(records: Mapping[str, OutputsRecord]) -> dict[str, Path]:
    """Job id -> the local file of its first stored output (file:// copies only)."""
    saved: dict[str, Path] = {}
    for job_id, record in records.items():
        uri = record.stored[0].uri if record.stored else ""
        if uri.startswith("file://"):
            path = Path(unquote(urlsplit(uri).path))
            # Shown relative to where `kq run` was started when it is below it.
            saved[job_id] = (
                path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
            )
    return saved


def _print_outputs(
    console: Console, records: Mapping[str, OutputsRecord], outputs_url: str
) -> None:
    if not records:
        return
    stored = sum(len(r.stored) for r in records.values() if r.state == "stored")
    where = unquote(outputs_url.removeprefix("file://"))
    console.print(f"  {stored} output images saved in {where}")
    failed = Counter(r.reason or "unknown" for r in records.values() if r.state == "failed")
    if failed:
        reasons = ", ".join(f"{n} {reason}" for reason, n in failed.most_common())
        console.print(f"  [red]outputs not kept for {sum(failed.values())} jobs[/red]: {reasons}")
    pending = sum(1 for r in records.values() if not r.settled)
    if pending:
        console.print(f"  [yellow]{pending} jobs' outputs were still being copied[/yellow]")
