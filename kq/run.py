"""`kq run FILE`: start the local stack, process a JSONL file of edits, show the results.

The file is validated completely before anything starts, so a bad line costs
nothing. Against the simulator, some webhook deliveries are dropped on purpose so
that both result paths (webhook and poll) show in the summary.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kq.ui import make_console, result_table
from worker.domain import EditRequest, Job, summary_line
from worker.errors import FieldError, ValidationError
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
MAX_DOWNLOADS = 1000


def read_requests(path: Path) -> list[EditRequest]:
    """Parse and validate a JSONL file; raises ValidationError listing line and field."""
    if not path.exists():
        raise ValidationError.single("FILE", f"{path} does not exist")
    requests: list[EditRequest] = []
    errors: list[FieldError] = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                requests.append(EditRequest.from_dict(json.loads(text)))
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
    from worker.producer import Producer
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
    )
    console.print(f"[bold]kq run[/bold]: {len(requests)} edits from {path}")
    stack = Stack(config, announce=lambda line: console.print(f"  {line}"))
    # Ctrl-C or SIGTERM mid-run still stops every process the stack started.
    with signals_as_keyboard_interrupt(), stack:
        settings = stack.child_settings()
        configure(settings)
        producer = Producer(store=runtime.make_store(settings), send=enqueue_submits)
        started = time.monotonic()
        receipt = producer.enqueue_batch(requests, batch_id=f"run-{int(time.time())}")
        job_ids = producer.store.batch_members(receipt.batch_id)
        jobs = _wait_with_progress(console, producer, job_ids, timeout_s)
        elapsed = time.monotonic() - started
        # Simulator outputs vanish with the simulator, and real ones after 7 days.
        saved = download_outputs(jobs, var_dir / "outputs")
        if saved:
            console.print(f"  {len(saved)} output images saved in {var_dir / 'outputs'}")
        console.print(f"  logs of every process: {var_dir / 'logs'}")
    counts = tally(jobs)
    if as_json:
        for job_id, job in zip(job_ids, jobs, strict=True):
            print(json.dumps(_job_row(job_id, job)))
    else:
        console.print(result_table(job_ids, jobs, saved))
        console.print(f"finished in {elapsed:.1f} s")
    print(summary_line(counts))
    return 0 if counts.get("pending", 0) == 0 else 1


def _wait_with_progress(
    console: Console, producer: object, job_ids: Sequence[str], timeout_s: float
) -> list[Job | None]:
    from worker.producer import Producer

    assert isinstance(producer, Producer)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        task = progress.add_task("edits", total=len(job_ids), detail="")

        def show(jobs: list[Job | None]) -> None:
            c = tally(jobs)
            done = c["completed"] + c["failed"] + c["cancelled"]
            detail = (
                f"{c['completed']} completed, {c['failed']} failed, "
                f"{c['in_flight']} at provider, {c['queued']} queued"
            )
            progress.update(task, completed=done, detail=detail)

        return producer.wait(job_ids, timeout_s=timeout_s, on_progress=show)


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


def _job_row(job_id: str, job: Job | None) -> dict[str, object]:
    if job is None:
        return {"job_id": job_id, "state": "missing"}
    return {
        "job_id": job_id,
        "state": job.state.value,
        "outputs": list(job.outputs),
        "reason": job.reason,
        "error": job.error,
        "resolved_by": job.resolved_by,
        "seconds": job.seconds,
        "prediction_id": job.prediction_id,
    }


def download_outputs(jobs: Sequence[Job | None], folder: Path) -> dict[str, Path]:
    """Fetch each completed job's first output into `folder`; job id -> file (best effort)."""
    wanted = [j for j in jobs if j is not None and j.outputs][:MAX_DOWNLOADS]
    if not wanted:
        return {}
    folder.mkdir(parents=True, exist_ok=True)

    def fetch(client: httpx.Client, job: Job) -> tuple[str, Path] | None:
        suffix = Path(urlsplit(job.outputs[0]).path).suffix or ".jpeg"
        target = folder / f"{job.id[:8]}{suffix}"
        try:
            response = client.get(job.outputs[0])
            response.raise_for_status()
        except httpx.HTTPError:
            return None
        target.write_bytes(response.content)
        return job.id, target

    with httpx.Client(timeout=30, follow_redirects=True) as client, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: fetch(client, job), wanted))
    return dict(r for r in results if r is not None)
