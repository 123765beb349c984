"""The events of `kq:events`, decoded: one per finished job (`ResultEvent`), one per
finished chain run (`ChainEvent`), one per job whose outputs were copied out or given up
on (`OutputsEvent`). The contract is docs/events.md; readers are in `worker.events`.

Pure: decoding only, tolerant of missing or odd fields (an entry is never refused).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Final

SCHEMA_VERSION: Final = 2
# The `type` field of an entry; entries written before schema 2 have none and are jobs.
JOB, CHAIN, OUTPUTS = "job", "chain", "outputs"
EVENT_TYPES: Final = (JOB, CHAIN, OUTPUTS)


class _Timed:
    id: str

    @property
    def time(self) -> float:
        """When the event was appended (from its stream id), unix seconds."""
        return int(self.id.split("-", 1)[0]) / 1000.0


@dataclass(frozen=True)
class ResultEvent(_Timed):
    """One terminal job result, decoded from a `kq:events` entry (see docs/events.md).

    Times are unix seconds (None when the job never reached that step). `fields`
    keeps the raw entry, so fields added by a later schema are not lost.
    """

    id: str
    schema: int
    job_id: str
    batch_id: str
    state: str
    prediction_id: str
    outputs: tuple[str, ...]
    error: str
    reason: str
    task_code: int | None
    resolved_by: str
    created_at: float | None
    submitted_at: float | None
    finished_at: float | None
    attempts: int
    version: int
    # The producer's own key and metadata object (added to schema 1; see docs/events.md).
    idempotency_key: str = ""
    metadata: Mapping[str, Any] | None = None
    # Where the job sits in a chain (schema 2): empty / None for a plain job.
    chain_id: str = ""
    step: int | None = None
    branch: str = ""
    type: str = JOB
    fields: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def latency_s(self) -> float | None:
        """From enqueue to result; None if either time is unknown."""
        if self.created_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.created_at)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the decoded fields plus the stream id (raw fields left out)."""
        data = asdict(self)
        data.pop("fields")
        data["outputs"] = list(self.outputs)
        data["metadata"] = None if self.metadata is None else dict(self.metadata)
        return data


def decode_event(entry_id: Any, raw: Mapping[Any, Any]) -> ResultEvent:
    """Build a ResultEvent from a stream entry; tolerant of missing or odd fields."""
    f = {as_text(k): as_text(v) for k, v in raw.items()}
    outputs = _strings(f.get("outputs"))
    return ResultEvent(
        id=as_text(entry_id),
        schema=_int(f.get("schema"), 1) or 1,
        job_id=f.get("job_id", ""),
        batch_id=f.get("batch_id", ""),
        state=f.get("state", ""),
        prediction_id=f.get("prediction_id", ""),
        outputs=outputs,
        error=f.get("error", ""),
        reason=f.get("reason", ""),
        task_code=_int(f["task_code"], None) if f.get("task_code") else None,
        resolved_by=f.get("resolved_by", ""),
        created_at=_float(f.get("created_at")),
        submitted_at=_float(f.get("submitted_at")),
        finished_at=_float(f.get("finished_at")),
        attempts=_int(f.get("attempts"), 0) or 0,
        version=_int(f.get("version"), 0) or 0,
        idempotency_key=f.get("idempotency_key", ""),
        metadata=_object(f.get("metadata")),
        chain_id=f.get("chain_id", ""),
        step=_int(f["step"], None) if f.get("step") else None,
        branch=f.get("branch", ""),
        type=f.get("type") or JOB,
        fields=f,
    )


@dataclass(frozen=True)
class ChainEvent(_Timed):
    """A chain run ended: its last open branch finished (see docs/events.md, "Chains")."""

    id: str
    schema: int
    chain_id: str
    batch_id: str
    state: str  # completed | failed | cancelled
    run: int  # 1, then +1 each time a retried step reopened the chain
    steps: int
    branches: int
    outputs: tuple[str, ...]  # the last step's outputs of every completed branch
    results: tuple[Mapping[str, Any], ...]  # per branch: branch, state, step, job_id, ...
    failed_step: int | None
    reason: str
    error: str
    created_at: float | None
    finished_at: float | None
    idempotency_key: str = ""
    metadata: Mapping[str, Any] | None = None
    type: str = CHAIN
    fields: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("fields")
        data["outputs"] = list(self.outputs)
        data["results"] = [dict(r) for r in self.results]
        data["metadata"] = None if self.metadata is None else dict(self.metadata)
        return data


@dataclass(frozen=True)
class StoredOutput:
    """One output image copied to durable storage."""

    uri: str
    source_url: str
    size: int
    content_type: str
    sha256: str


@dataclass(frozen=True)
class OutputsEvent(_Timed):
    """A completed job's outputs were copied out (`stored`), or the copy was given up."""

    id: str
    schema: int
    job_id: str
    batch_id: str
    state: str  # stored | failed
    stored: tuple[StoredOutput, ...]
    error: str
    reason: str
    finished_at: float | None
    idempotency_key: str = ""
    metadata: Mapping[str, Any] | None = None
    type: str = OUTPUTS
    fields: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("fields")
        data["stored"] = [asdict(s) for s in self.stored]
        data["metadata"] = None if self.metadata is None else dict(self.metadata)
        return data


Event = ResultEvent | ChainEvent | OutputsEvent


def event_type(raw: Mapping[Any, Any]) -> str:
    """The `type` of a raw entry (`job` for entries written before schema 2)."""
    value = raw.get("type", raw.get(b"type"))
    return as_text(value) if value else JOB


def decode_any(entry_id: Any, raw: Mapping[Any, Any]) -> Event:
    """Decode an entry of any type into its own class."""
    kind = event_type(raw)
    if kind == CHAIN:
        return decode_chain_event(entry_id, raw)
    if kind == OUTPUTS:
        return decode_outputs_event(entry_id, raw)
    return decode_event(entry_id, raw)


def decode_chain_event(entry_id: Any, raw: Mapping[Any, Any]) -> ChainEvent:
    f = {as_text(k): as_text(v) for k, v in raw.items()}
    results = _json(f.get("results"))
    return ChainEvent(
        id=as_text(entry_id),
        schema=_int(f.get("schema"), 2) or 2,
        chain_id=f.get("chain_id", ""),
        batch_id=f.get("batch_id", ""),
        state=f.get("state", ""),
        run=_int(f.get("run"), 1) or 1,
        steps=_int(f.get("steps"), 0) or 0,
        branches=_int(f.get("branches"), 0) or 0,
        outputs=_strings(f.get("outputs")),
        results=tuple(r for r in results if isinstance(r, dict))
        if isinstance(results, list)
        else (),
        failed_step=_int(f["failed_step"], None) if f.get("failed_step") else None,
        reason=f.get("reason", ""),
        error=f.get("error", ""),
        created_at=_float(f.get("created_at")),
        finished_at=_float(f.get("finished_at")),
        idempotency_key=f.get("idempotency_key", ""),
        metadata=_object(f.get("metadata")),
        fields=f,
    )


def decode_outputs_event(entry_id: Any, raw: Mapping[Any, Any]) -> OutputsEvent:
    f = {as_text(k): as_text(v) for k, v in raw.items()}
    items = _json(f.get("stored"))
    stored = tuple(
        StoredOutput(
            uri=str(i.get("uri", "")),
            source_url=str(i.get("source_url", "")),
            size=_int(i.get("size"), 0) or 0,
            content_type=str(i.get("content_type", "")),
            sha256=str(i.get("sha256", "")),
        )
        for i in (items if isinstance(items, list) else [])
        if isinstance(i, dict)
    )
    return OutputsEvent(
        id=as_text(entry_id),
        schema=_int(f.get("schema"), 2) or 2,
        job_id=f.get("job_id", ""),
        batch_id=f.get("batch_id", ""),
        state=f.get("state", ""),
        stored=stored,
        error=f.get("error", ""),
        reason=f.get("reason", ""),
        finished_at=_float(f.get("finished_at")),
        idempotency_key=f.get("idempotency_key", ""),
        metadata=_object(f.get("metadata")),
        fields=f,
    )


def _json(value: str | None) -> Any:
    try:
        return json.loads(value or "null")
    except ValueError:
        return None


def _strings(value: str | None) -> tuple[str, ...]:
    data = _json(value)
    return tuple(str(x) for x in data) if isinstance(data, list) else ()


def as_text(value: Any) -> str:
    """A Redis reply value as text (bytes decoded)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: Any, default: int | None) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _object(value: str | None) -> dict[str, Any] | None:
    """A JSON object field ('' or anything else that is not an object: None)."""
    if not value:
        return None
    try:
        data = json.loads(value)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None
