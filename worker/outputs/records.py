"""The Redis side of copy-out: claim due jobs, record a result once, schedule a retry,
and read what `kq job`, `kq status` and the metrics show.

A job's copy-out lives in its own hash (`kq:job:{id}`, so it expires with the job):

    outputs_state        ""/missing (not settled yet, never tried), "retrying",
                         "stored" or "failed" (both final: written once, with the event)
    stored_outputs       JSON list of the copies (see worker.event_types.StoredOutput)
    outputs_error, outputs_reason   the last failure (the final one once "failed")
    outputs_attempts     failed attempts so far; outputs_download_failures: of them,
                         those where the provider's download failed
    outputs_since        when a copier first took the job
    outputs_finished_at, outputs_event_id   when it settled, and its `outputs` event

Every write is one Lua script (lua/outputs_*.lua), so a copier killed at any point
leaves the job either due (and leased for a while) or settled, never half-recorded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any, Final

import redis

from worker import keys
from worker.event_types import StoredOutput
from worker.snapshot import OutputsBacklog

STORED: Final = "stored"
FAILED: Final = "failed"
RETRYING: Final = "retrying"
FINAL_STATES: Final = (STORED, FAILED)
_FIELDS: Final = (
    "state",
    "finished_at",
    "outputs_state",
    "stored_outputs",
    "outputs_error",
    "outputs_reason",
    "outputs_attempts",
    "outputs_since",
    "outputs_finished_at",
)


def _script(name: str) -> str:
    return resources.files("worker").joinpath("lua", name).read_text()


@dataclass(frozen=True)
class OutputsRecord:
    """A job's copy-out as recorded on the job (see the module docstring)."""

    state: str  # "" (pending), retrying, stored, failed
    stored: tuple[StoredOutput, ...]
    error: str
    reason: str
    attempts: int
    finished_at: float | None

    @property
    def settled(self) -> bool:
        """Stored or failed for good: nothing more will happen to it."""
        return self.state in FINAL_STATES

    def to_json(self) -> dict[str, Any]:
        """The fields `kq job --json` adds for a job whose outputs are kept."""
        return {
            "outputs_state": self.state or "pending",
            "stored_outputs": [asdict(s) for s in self.stored],
            "outputs_error": self.error,
            "outputs_reason": self.reason,
            "outputs_attempts": self.attempts,
        }


class OutputsStore:
    """The copy-out records and schedule in Redis."""

    def __init__(self, client: redis.Redis, *, events_maxlen: int, failed_ttl_s: int) -> None:
        self.redis = client
        self.events_maxlen = events_maxlen
        self.failed_ttl_s = failed_ttl_s
        self._claim = client.register_script(_script("outputs_claim.lua"))
        self._record = client.register_script(_script("outputs_record.lua"))
        self._retry = client.register_script(_script("outputs_retry.lua"))

    def claim(self, now: float, *, limit: int, lease_s: float) -> list[str]:
        """Due job ids, each leased until now + lease_s (no other copier takes it)."""
        ids = self._claim(keys=[keys.OUTPUTS_DUE], args=[now, limit, lease_s, keys.JOB_PREFIX])
        return [str(x) for x in ids]

    def job_fields(self, job_id: str) -> dict[str, str]:
        """The fields of the job a copier needs (empty when the record is gone)."""
        names = (
            "id",
            "state",
            "outputs",
            "finished_at",
            "outputs_state",
            "outputs_attempts",
            "outputs_download_failures",
            "outputs_since",
        )
        values: Any = self.redis.hmget(keys.job(job_id), names)
        return {n: str(v) for n, v in zip(names, values, strict=True) if v is not None}

    def record(
        self,
        job_id: str,
        state: str,
        stored: Sequence[StoredOutput],
        *,
        error: str = "",
        reason: str = "",
        now: float,
    ) -> tuple[str, str]:
        """Settle the job's copy-out (`stored` or `failed`) and append its event, once.
        Answers (outcome, event id): applied, duplicate (settled before) or missing."""
        text = json.dumps([asdict(s) for s in stored], separators=(",", ":"))
        size = sum(s.size for s in stored)
        outcome, event_id = self._record(
            keys=[
                keys.job(job_id),
                keys.EVENTS,
                keys.OUTPUTS_DUE,
                keys.OUTPUTS_FAILED,
                keys.OUTPUTS_STATS,
            ],
            args=[
                job_id,
                state,
                text,
                error,
                reason,
                now,
                self.events_maxlen,
                size,
                self.failed_ttl_s,
            ],
        )
        return str(outcome), str(event_id)

    def retry(self, job_id: str, at: float, *, error: str, reason: str, download: bool) -> int:
        """Note a passing failure and try again at `at`; the failed attempts so far, or
        -1 when the job's copy-out was settled (or the job expired) meanwhile."""
        n = self._retry(
            keys=[keys.job(job_id), keys.OUTPUTS_DUE, keys.OUTPUTS_STATS],
            args=[job_id, at, error[:500], reason, "1" if download else "0"],
        )
        return int(n)

    def read(self, job_id: str) -> OutputsRecord | None:
        """The job's copy-out (see `read_record`)."""
        return read_record(self.redis, job_id)

    def backlog(self, now: float, **kwargs: Any) -> OutputsBacklog | None:
        """How far copy-out is behind (see `read_backlog`)."""
        return read_backlog(self.redis, now, **kwargs)


def read_record(client: redis.Redis, job_id: str) -> OutputsRecord | None:
    """A job's copy-out, or None when the job is unknown or its outputs are not kept
    (never queued: a deployment without KQ_OUTPUTS, or a job that did not complete)."""
    pipe = client.pipeline(transaction=False)
    pipe.hmget(keys.job(job_id), _FIELDS)
    pipe.zscore(keys.OUTPUTS_DUE, job_id)
    values, due = pipe.execute()
    raw = {n: str(v) for n, v in zip(_FIELDS, values, strict=True) if v is not None}
    if not raw.get("state") or (not raw.get("outputs_state") and due is None):
        return None
    return OutputsRecord(
        state=raw.get("outputs_state", ""),
        stored=parse_stored(raw.get("stored_outputs")),
        error=raw.get("outputs_error", ""),
        reason=raw.get("outputs_reason", ""),
        attempts=_int(raw.get("outputs_attempts")),
        finished_at=_float(raw.get("outputs_finished_at")),
    )


def read_backlog(
    client: redis.Redis,
    now: float,
    *,
    alert_after_s: float,
    failed_window_s: float,
    scan: int = 10_000,
) -> OutputsBacklog | None:
    """How far copy-out is behind: a bounded scan of kq:outputs:due (`scan` entries, the
    earliest due first) reading each job's completion time, plus the counters. None when
    no job's outputs were ever kept here (nothing due, nothing counted)."""
    pipe = client.pipeline(transaction=False)
    pipe.zcard(keys.OUTPUTS_DUE)
    pipe.zrange(keys.OUTPUTS_DUE, 0, scan - 1)
    pipe.zcount(keys.OUTPUTS_FAILED, now - failed_window_s, "+inf")
    pipe.hgetall(keys.OUTPUTS_STATS)
    total, members, failed_recent, stats = pipe.execute()
    counters = {str(k): _int(v) for k, v in (stats or {}).items()}
    if not total and not counters:
        return None
    ids = [str(m) for m in members]
    ages: list[float] = []
    for start in range(0, len(ids), 500):
        pipe = client.pipeline(transaction=False)
        for job_id in ids[start : start + 500]:
            pipe.hmget(keys.job(job_id), ("finished_at", "outputs_state"))
        for finished, state in pipe.execute():
            if _float(finished) and state not in FINAL_STATES:
                ages.append(max(0.0, now - float(finished)))
    return OutputsBacklog(
        pending=int(total),
        overdue=sum(1 for age in ages if age >= alert_after_s),
        oldest_s=round(max(ages), 1) if ages else None,
        failed_recent=int(failed_recent),
        stored=counters.get(STORED, 0),
        failed=counters.get(FAILED, 0),
        retries=counters.get("retries", 0),
        bytes=counters.get("bytes", 0),
        alert_after_s=alert_after_s,
    )


def parse_stored(text: str | None) -> tuple[StoredOutput, ...]:
    """A `stored` / `stored_outputs` JSON list, decoded (odd entries skipped)."""
    try:
        items = json.loads(text or "[]")
    except ValueError:
        return ()
    if not isinstance(items, list):
        return ()
    return tuple(
        StoredOutput(
            uri=str(i.get("uri", "")),
            source_url=str(i.get("source_url", "")),
            size=_int(i.get("size")),
            content_type=str(i.get("content_type", "")),
            sha256=str(i.get("sha256", "")),
        )
        for i in items
        if isinstance(i, dict)
    )


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None
