"""The Python API producers call: enqueue edits, read jobs back, wait for results.

No Celery objects appear in these signatures; the submit queue is handed in as a
plain callable (`worker.tasks.enqueue_submits` in production).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from worker.domain import EditRequest, Job, check_key
from worker.store import JobStore

# Jobs are written and queued in chunks: one Redis round trip per chunk, not per job.
ENQUEUE_CHUNK = 500
WAIT_POLL_S = 0.2


def new_job_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Producer:
    """Enqueue jobs and read them back. Thread-safe when its adapters are."""

    store: JobStore
    send: Callable[[list[str]], None]
    clock: Callable[[], float] = field(default=time.time)

    def enqueue(self, request: EditRequest | Mapping[str, object], *, batch_id: str = "") -> str:
        """Validate and enqueue one edit; returns its job id."""
        return self.enqueue_many([request], batch_id=batch_id)[0]

    def enqueue_many(
        self, requests: Iterable[EditRequest | Mapping[str, object]], *, batch_id: str = ""
    ) -> list[str]:
        """Enqueue many edits, streamed in chunks; returns their job ids in order.

        Every request is validated before its chunk is written, so a bad one raises
        `ValidationError` and nothing of its chunk (or later) is enqueued.
        """
        check_key("batch_id", batch_id or None)
        ids: list[str] = []
        chunk: list[tuple[str, EditRequest]] = []
        for item in requests:
            request = item if isinstance(item, EditRequest) else EditRequest.from_dict(item)
            chunk.append((new_job_id(), request))
            if len(chunk) >= ENQUEUE_CHUNK:
                ids.extend(self._write(chunk, batch_id))
                chunk = []
        if chunk:
            ids.extend(self._write(chunk, batch_id))
        return ids

    def _write(self, chunk: list[tuple[str, EditRequest]], batch_id: str) -> list[str]:
        # The record first, then the message: a worker never gets an id it cannot read.
        self.store.create_many(chunk, batch_id=batch_id, now=self.clock())
        ids = [job_id for job_id, _ in chunk]
        self.send(ids)
        return ids

    def get(self, job_id: str) -> Job | None:
        return self.store.get(job_id)

    def wait(
        self,
        job_ids: Sequence[str],
        *,
        timeout_s: float,
        on_progress: Callable[[list[Job | None]], None] | None = None,
    ) -> list[Job | None]:
        """Block until every job is terminal or `timeout_s` passes; returns the last view."""
        deadline = time.monotonic() + timeout_s
        while True:
            jobs = self.store.get_many(job_ids)
            if on_progress is not None:
                on_progress(jobs)
            if all(j is not None and j.terminal for j in jobs) or time.monotonic() >= deadline:
                return jobs
            time.sleep(WAIT_POLL_S)
