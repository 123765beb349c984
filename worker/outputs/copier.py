"""The copy-out sweep: take due jobs, copy each one's outputs, settle or reschedule them.

`kq beat` schedules `kq.copy_outputs` every second; each run is one `Copier.sweep`:

1. `OutputsStore.claim` takes the due jobs of kq:outputs:due and leases them (pushes
   their score past the time a copy can take), so sweeps running side by side never copy
   one job twice at once, and a sweep killed mid-copy leaves its jobs to the next.
2. Each job's outputs are downloaded (`fetch.download`: bounded size and time, magic
   bytes checked) and stored (`Storage.put`) one after the other; jobs run side by side
   on a thread pool.
3. All stored: `record(stored)` writes `stored_outputs` and the `outputs` event in one
   step. A permanent failure (see `fetch`): `record(failed)` with its reason. A passing
   one: `retry` at now + back-off (doubling from KQ_OUTPUTS_RETRY_BASE_S, capped, with
   jitter) unless the job is past its limits: KQ_OUTPUTS_MAX_ATTEMPTS failed downloads, or
   KQ_OUTPUTS_GIVE_UP_S since it completed (storage trouble retries until then: the
   provider still holds the images, and `kq status` warns after KQ_OUTPUTS_ALERT_AFTER_S).

Nothing here touches the job's state: the job was `completed` (and its result event
published) before any of this began, so a slow or broken bucket holds nothing up.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Final

import httpx
import redis
import structlog

from worker.event_types import StoredOutput
from worker.outputs.backends import open_storage
from worker.outputs.fetch import EXTENSIONS, CopyError, download
from worker.outputs.records import FAILED, STORED, OutputsStore
from worker.outputs.storage import Storage, StorageError
from worker.settings import Settings

log = structlog.get_logger("kq.outputs")

# Jobs taken per sweep, and the threads that copy them side by side.
SWEEP_LIMIT: Final = 64
COPY_THREADS: Final = 8
# The longest wait between two attempts.
RETRY_CAP_S: Final = 900.0


@dataclass
class CopyReport:
    """What one sweep did: jobs claimed, and by outcome (stored, failed, retry, ...)."""

    claimed: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)


def retry_delay(attempt: int, base_s: float, *, cap_s: float = RETRY_CAP_S) -> float:
    """Back-off before try `attempt + 1`: base, 2 x base, 4 x base ... capped, jittered
    down to half so copiers that failed together do not retry together."""
    ceiling = min(cap_s, base_s * 2 ** max(0, min(attempt - 1, 30)))
    return random.uniform(ceiling / 2, ceiling)


class Copier:
    """Copies completed jobs' outputs from the provider into `storage`."""

    def __init__(
        self,
        records: OutputsStore,
        storage: Storage,
        settings: Settings,
        *,
        http: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.records = records
        self.storage = storage
        self.settings = settings
        self.clock = clock
        # trust_env=False: provider URLs are fetched directly, as the worker's own
        # client calls the provider; no proxy from the environment sits in between.
        self.http = http or httpx.Client(
            trust_env=False,
            limits=httpx.Limits(max_connections=COPY_THREADS * 2),
            headers={"user-agent": "kontext-queue copy-out"},
        )

    @property
    def lease_s(self) -> float:
        """How long a claimed job is left to its copier: more than a copy can take."""
        return 10 * self.settings.outputs_timeout_s + 120

    def sweep(self, pool: ThreadPoolExecutor | None = None) -> CopyReport:
        """Copy every due job once; safe to run from several workers at the same time."""
        due = self.records.claim(self.clock(), limit=SWEEP_LIMIT, lease_s=self.lease_s)
        report = CopyReport(claimed=len(due))
        if not due:
            return report
        if pool is None:
            outcomes = [self.copy_job(job_id) for job_id in due]
        else:
            outcomes = list(pool.map(self.copy_job, due))
        report.outcomes.update(outcomes)
        return report

    def copy_job(self, job_id: str) -> str:
        """Copy one claimed job's outputs; its outcome (stored, failed, retry, gone)."""
        with structlog.contextvars.bound_contextvars(job_id=job_id):
            try:
                return self._copy_job(job_id)
            except redis.RedisError as exc:
                # The job stays leased; the lease running out brings it back.
                log.warning("outputs.redis_error", error=repr(exc))
                return "redis_error"

    def _copy_job(self, job_id: str) -> str:
        job = self.records.job_fields(job_id)
        if not job.get("state"):
            return "gone"
        if job.get("outputs_state") in (STORED, FAILED):
            return "duplicate"
        try:
            urls = [str(u) for u in json.loads(job.get("outputs") or "[]")]
        except ValueError:
            urls = []
        try:
            stored = [self._copy_one(job_id, n, url) for n, url in enumerate(urls)]
        except CopyError as exc:
            return self._failed(
                job_id, job, exc.reason, str(exc), permanent=exc.permanent, download=True
            )
        except StorageError as exc:
            return self._failed(
                job_id, job, "storage_failed", str(exc), permanent=False, download=False
            )
        except Exception as exc:  # a bug or an odd library error must not stop the sweep
            log.exception("outputs.unexpected_error")
            return self._failed(
                job_id,
                job,
                "storage_failed",
                f"{type(exc).__name__}: {exc}",
                permanent=False,
                download=False,
            )
        outcome, _ = self.records.record(job_id, STORED, stored, now=self.clock())
        if outcome == "applied":
            log.info("outputs.stored", count=len(stored), uris=[s.uri for s in stored])
            return STORED
        return outcome

    def _copy_one(self, job_id: str, n: int, url: str) -> StoredOutput:
        got = download(
            self.http,
            url,
            max_bytes=self.settings.outputs_max_bytes,
            timeout_s=self.settings.outputs_timeout_s,
        )
        with got.body:
            key = f"{job_id}/{n}.{EXTENSIONS.get(got.content_type, 'bin')}"
            uri = self.storage.put(
                key, got.body, size=got.size, content_type=got.content_type, sha256=got.sha256
            )
        return StoredOutput(
            uri=uri,
            source_url=url,
            size=got.size,
            content_type=got.content_type,
            sha256=got.sha256,
        )

    def _failed(
        self,
        job_id: str,
        job: dict[str, str],
        reason: str,
        error: str,
        *,
        permanent: bool,
        download: bool,
    ) -> str:
        now = self.clock()
        settings = self.settings
        attempts = _int(job.get("outputs_attempts")) + 1
        downloads = _int(job.get("outputs_download_failures")) + (1 if download else 0)
        completed_at = _float(job.get("finished_at")) or _float(job.get("outputs_since")) or now
        give_up = completed_at + settings.outputs_give_up_s
        if not permanent and downloads >= settings.outputs_max_attempts:
            permanent, error = True, f"{error} (after {downloads} failed downloads)"
        if not permanent and now >= give_up:
            permanent = True
            error = f"{error} (still failing {settings.outputs_give_up_s:.0f} s after the job)"
        if permanent:
            outcome, _ = self.records.record(
                job_id, FAILED, [], error=error, reason=reason, now=now
            )
            if outcome == "applied":
                log.warning("outputs.failed", reason=reason, error=error, attempts=attempts)
                return FAILED
            return outcome
        at = min(give_up, now + retry_delay(attempts, settings.outputs_retry_base_s))
        self.records.retry(job_id, at, error=error, reason=reason, download=download)
        log.info(
            "outputs.retry",
            reason=reason,
            error=error,
            attempt=attempts,
            retry_in_s=round(at - now, 1),
        )
        return "retry"


def make_copier(client: redis.Redis, settings: Settings) -> Copier:
    """The copier a worker process runs, on its job store's Redis (KQ_OUTPUTS must be set)."""
    storage = open_storage(settings.outputs_url, s3_endpoint_url=settings.s3_endpoint_url)
    records = OutputsStore(
        client, events_maxlen=settings.events_maxlen, failed_ttl_s=settings.result_ttl_s
    )
    log.info("outputs.copy_out", storage=storage.describe())
    return Copier(records, storage, settings)


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _float(value: str | None) -> float | None:
    try:
        number = float(value or 0)
    except ValueError:
        return None
    return number if number > 0 else None
