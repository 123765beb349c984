"""Chains of edits: step 1 edits the source image, each next step edits the previous
step's first output. A step may fan out into variants, each going on as its own branch.

Pure (no I/O). A chain is validated whole here, before anything is written; its steps
are stored as request templates that lua/chain_step.lua completes with the previous
output when a step ends (see `ChainStore` for the records, docs/events.md for events).

Input (a JSONL line, the Python API, `POST /v1/chains`)::

    {"image": "https://…/cat.png",                 # the source (`images` for /multi models)
     "model": "…", "seed": 7, "guidance_scale": 3.5, "aspect_ratio": "1:1",  # defaults
     "steps": [{"prompt": "make it night"},
               {"prompt": "add snow", "variants": [{"seed": 1}, {"seed": 2}]},
               {"prompt": "oil painting", "model": "wavespeed-ai/flux-kontext-pro"}],
     "idempotency_key": "…", "priority": 0, "metadata": {…}}

A step's fields override the chain's defaults; a variant's override its step's.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from worker.domain import EditRequest, check_key, check_priority, job_id_for_key, kind_of
from worker.errors import FieldError, ValidationError
from worker.items import check_metadata
from worker.models import MODELS, lookup

MAX_STEPS: Final = 10
MAX_VARIANTS: Final = 8
# Every branch is a job per step: bound what one line can cost.
MAX_BRANCHES: Final = 16
# What a chain line may carry besides its steps: defaults for every step, and the envelope.
CHAIN_DEFAULTS: Final = ("model", "seed", "guidance_scale", "aspect_ratio")
CHAIN_FIELDS: Final = (
    "image",
    "images",
    "steps",
    *CHAIN_DEFAULTS,
    "idempotency_key",
    "priority",
    "metadata",
)
STEP_FIELDS: Final = ("prompt", "images", "variants", *CHAIN_DEFAULTS)
VARIANT_FIELDS: Final = ("prompt", "images", *CHAIN_DEFAULTS)
T = TypeVar("T")
# Stands in for the previous step's output in a later step's request (validated with it,
# stored with it; lua/chain_step.lua replaces it, the same text, with the output URL).
PREVIOUS_OUTPUT: Final = "https://previous-step.invalid/output"


class ChainState:
    RUNNING: Final = "running"
    COMPLETED: Final = "completed"
    FAILED: Final = "failed"
    CANCELLED: Final = "cancelled"
    TERMINAL: Final = (COMPLETED, FAILED, CANCELLED)


@dataclass(frozen=True)
class Variant:
    """One job a step makes: its request, less the input the previous step supplies."""

    request: EditRequest  # for step 1: complete; later: its input is PREVIOUS_OUTPUT
    input: str  # "image" or "images": where the previous step's output goes

    def template(self) -> dict[str, Any]:
        """The stored form: the request as JSON text, in which lua/chain_step.lua puts
        the previous output in place of PREVIOUS_OUTPUT — a text splice, so no number is
        re-encoded on the way (cjson would round a guidance_scale to 14 digits)."""
        return {"request": json.dumps(self.request.to_dict(), separators=(",", ":"))}


@dataclass(frozen=True)
class ChainItem:
    """One validated chain, ready to write: steps of variants, plus the envelope."""

    steps: tuple[tuple[Variant, ...], ...]
    idempotency_key: str = ""
    priority: int = 0
    metadata: Mapping[str, Any] | None = field(default=None, hash=False)
    chain_id: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.chain_id:
            key = self.idempotency_key
            chain_id = job_id_for_key(f"chain:{key}") if key else uuid.uuid4().hex
            object.__setattr__(self, "chain_id", chain_id)

    def with_key(self, key: str) -> ChainItem:
        return ChainItem(self.steps, key, self.priority, self.metadata)

    def steps_json(self) -> str:
        return json.dumps(
            [[v.template() for v in variants] for variants in self.steps],
            separators=(",", ":"),
            ensure_ascii=False,
        )

    def first_jobs(self) -> list[tuple[str, str, EditRequest]]:
        """(job id, branch, request) of the step-1 jobs written with the chain."""
        variants = self.steps[0]
        return [
            (step_job_id(self.chain_id, branch, 1), branch, v.request)
            for branch, v in zip(branch_names("1", len(variants)), variants, strict=True)
        ]

    @property
    def price_micros(self) -> int:
        """What the whole chain costs if every step of every branch completes."""
        total, branches = 0, 1
        for variants in self.steps:
            total += branches * sum(v.request.price_micros for v in variants)
            branches *= len(variants)
        return total

    @property
    def branches(self) -> int:
        count = 1
        for variants in self.steps:
            count *= len(variants)
        return count


def branch_names(parent: str, count: int) -> list[str]:
    """Branch labels as lua/chain_step.lua makes them: `1`, fanned out as `1.1`, `1.2`…"""
    return [parent] if count == 1 else [f"{parent}.{i}" for i in range(1, count + 1)]


def step_job_id(chain_id: str, branch: str, step: int) -> str:
    """A step's job id, the same formula as lua/chain_step.lua (so a step is written once)."""
    return hashlib.sha1(  # an id, not a secret: sha1 because Lua has redis.sha1hex
        f"kq-chain:{chain_id}:{branch}:{step}".encode(), usedforsecurity=False
    ).hexdigest()[:32]


def is_chain(data: object) -> bool:
    """Whether a producer's item is a chain (it carries `steps`)."""
    return isinstance(data, Mapping) and "steps" in data


def chain_from_dict(data: object, *, refused: Mapping[str, str] | None = None) -> ChainItem:
    """Validate one chain whole; a ValidationError names every bad field (`steps[2].seed`)."""
    if not isinstance(data, Mapping):
        raise ValidationError.single("chain", f"expected a JSON object, got {kind_of(data)}")
    errors: list[FieldError] = []
    for name in sorted(map(str, data)):
        if refused and name in refused:
            errors.append(FieldError(name, refused[name]))
        elif name not in CHAIN_FIELDS:
            errors.append(
                FieldError(name, f"unknown field for a chain; allowed: {', '.join(CHAIN_FIELDS)}")
            )
    if "prompt" in data:
        errors.append(FieldError("prompt", "a chain has no prompt of its own: give each step one"))
    defaults = {k: data[k] for k in CHAIN_DEFAULTS if k in data}
    _check_defaults(defaults, errors)
    source = {k: data[k] for k in ("image", "images") if k in data}
    if not source:
        errors.append(FieldError("image", "is required: the source image of step 1"))
    steps = _steps(data.get("steps"), defaults, source, errors)
    key = _collect(errors, lambda: check_key("idempotency_key", data.get("idempotency_key")))
    priority = _collect(errors, lambda: check_priority(data.get("priority")))
    metadata = _collect(errors, lambda: check_metadata(data.get("metadata")))
    if errors:
        raise ValidationError(errors)
    return ChainItem(steps, key or "", priority or 0, metadata=metadata)


def _check_defaults(defaults: Mapping[str, Any], errors: list[FieldError]) -> None:
    """The chain's own defaults are checked as they are written, even where every step
    overrides them (a bad value is a mistake either way): the model by name, the rest
    against Kontext [max]'s ranges (a step's own model checks them again, merged)."""
    model = defaults.get("model")
    if model is not None and lookup(model) is None:
        errors.append(FieldError("model", f"unknown model {model!r}; known: {', '.join(MODELS)}"))
    options = {k: v for k, v in defaults.items() if k != "model"}
    try:
        EditRequest.from_dict({"prompt": "-", "image": PREVIOUS_OUTPUT, **options})
    except ValidationError as exc:
        errors.extend(exc.errors)


def _collect(errors: list[FieldError], check: Callable[[], T]) -> T | None:
    try:
        return check()
    except ValidationError as exc:
        errors.extend(exc.errors)
        return None


def _steps(
    raw: object, defaults: dict[str, Any], source: dict[str, Any], errors: list[FieldError]
) -> tuple[tuple[Variant, ...], ...]:
    if not isinstance(raw, list) or not raw:
        errors.append(
            FieldError("steps", f"expected a list of 1 to {MAX_STEPS} steps, got {kind_of(raw)}")
        )
        return ()
    if len(raw) > MAX_STEPS:
        errors.append(FieldError("steps", f"has {len(raw)} steps; at most {MAX_STEPS}"))
        return ()
    steps: list[tuple[Variant, ...]] = []
    branches = 1
    for n, step in enumerate(raw):
        where = f"steps[{n}]"
        if not isinstance(step, Mapping):
            errors.append(FieldError(where, f"expected a JSON object, got {kind_of(step)}"))
            continue
        errors.extend(
            FieldError(f"{where}.{k}", f"unknown field; allowed: {', '.join(STEP_FIELDS)}")
            for k in sorted(map(str, step))
            if k not in STEP_FIELDS
        )
        base = {**defaults, **{k: v for k, v in step.items() if k in STEP_FIELDS}}
        base.pop("variants", None)
        overrides = _variants(step.get("variants"), where, errors)
        branches *= len(overrides)
        variants = []
        for m, override in enumerate(overrides):
            label = where if len(overrides) == 1 else f"{where}.variants[{m}]"
            variant = _variant(
                {**base, **override}, (source or None) if n == 0 else None, label, errors
            )
            if variant is not None:
                variants.append(variant)
        steps.append(tuple(variants))
    if branches > MAX_BRANCHES:
        errors.append(
            FieldError("steps", f"fans out into {branches} branches; at most {MAX_BRANCHES}")
        )
    return tuple(steps)


def _variants(raw: object, where: str, errors: list[FieldError]) -> list[dict[str, Any]]:
    if raw is None:
        return [{}]
    if not isinstance(raw, list) or not 2 <= len(raw) <= MAX_VARIANTS:
        errors.append(
            FieldError(
                f"{where}.variants",
                f"expected a list of 2 to {MAX_VARIANTS} objects, got {kind_of(raw)}"
                + (f" of {len(raw)}" if isinstance(raw, list) else ""),
            )
        )
        return [{}]
    out: list[dict[str, Any]] = []
    for m, variant in enumerate(raw):
        if not isinstance(variant, Mapping):
            errors.append(
                FieldError(
                    f"{where}.variants[{m}]", f"expected a JSON object, got {kind_of(variant)}"
                )
            )
            continue
        bad = sorted(k for k in map(str, variant) if k not in VARIANT_FIELDS)
        errors.extend(
            FieldError(
                f"{where}.variants[{m}].{k}", f"unknown field; allowed: {', '.join(VARIANT_FIELDS)}"
            )
            for k in bad
        )
        out.append(dict(variant))
    return out or [{}]


def _variant(
    fields: dict[str, Any], source: dict[str, Any] | None, where: str, errors: list[FieldError]
) -> Variant | None:
    # null means "not set" for every field, as in a plain edit.
    fields = {k: v for k, v in fields.items() if v is not None}
    extra = fields.get("images")
    if extra is not None and not isinstance(extra, list):
        errors.append(
            FieldError(f"{where}.images", f"expected an array of image URLs, got {kind_of(extra)}")
        )
        return None
    model = lookup(fields.get("model", next(iter(MODELS))))
    input_field = model.image_field if model is not None else "image"
    request = dict(fields)
    if source is not None:
        if extra is not None:
            errors.append(
                FieldError(
                    f"{where}.images",
                    "step 1 edits the chain's own `image`/`images`: give the source there",
                )
            )
            return None
        request.update(source)
    elif input_field == "images":
        request["images"] = [PREVIOUS_OUTPUT, *(extra or [])]
    elif extra is not None:
        errors.append(
            FieldError(f"{where}.images", "only a /multi model takes `images` on a later step")
        )
        return None
    else:
        request["image"] = PREVIOUS_OUTPUT
    try:
        return Variant(EditRequest.from_dict(request), input_field)
    except ValidationError as exc:
        errors.extend(FieldError(f"{where}.{e.field}", e.message) for e in exc.errors)
        return None


@dataclass(frozen=True)
class ChainBranchEnd:
    """How one branch ended (recorded by lua/chain_step.lua)."""

    branch: str
    state: str
    step: int
    job_id: str
    outputs: tuple[str, ...]
    reason: str
    error: str


@dataclass(frozen=True)
class Chain:
    """A chain as stored: its steps' shape, state and the jobs written for it so far."""

    id: str
    state: str
    run: int
    steps: int
    variants_per_step: tuple[int, ...]
    open_branches: int
    cancel_requested: bool
    batch_id: str
    created_at: float
    finished_at: float | None
    job_ids: tuple[str, ...]
    ends: tuple[ChainBranchEnd, ...]
    event_id: str = ""
    idempotency_key: str = ""
    metadata: Mapping[str, Any] | None = None

    @property
    def terminal(self) -> bool:
        return self.state in ChainState.TERMINAL


def decode_chain(raw: Mapping[str, str], job_ids: Sequence[str], ends: Mapping[str, str]) -> Chain:
    steps = json.loads(raw.get("steps") or "[]")
    decoded_ends = []
    for branch in sorted(ends):
        e = json.loads(ends[branch])
        decoded_ends.append(
            ChainBranchEnd(
                branch=str(e.get("branch", branch)),
                state=str(e.get("state", "")),
                step=int(e.get("step") or 0),
                job_id=str(e.get("job_id", "")),
                outputs=tuple(str(o) for o in (e.get("outputs") or []) if isinstance(o, str)),
                reason=str(e.get("reason", "")),
                error=str(e.get("error", "")),
            )
        )
    metadata = json.loads(raw["metadata"]) if raw.get("metadata") else None
    return Chain(
        id=raw.get("id", ""),
        state=raw.get("state", ""),
        run=int(raw.get("run") or 1),
        steps=len(steps),
        variants_per_step=tuple(len(v) for v in steps),
        open_branches=int(raw.get("open") or 0),
        cancel_requested=raw.get("cancel") == "1",
        batch_id=raw.get("batch_id", ""),
        created_at=float(raw.get("created_at") or 0),
        finished_at=float(raw["finished_at"]) if raw.get("finished_at") else None,
        job_ids=tuple(job_ids),
        ends=tuple(decoded_ends),
        event_id=raw.get("event_id", ""),
        idempotency_key=raw.get("idempotency_key", ""),
        metadata=metadata if isinstance(metadata, dict) else None,
    )


def chain_json(chain: Chain, jobs: Sequence[Any]) -> dict[str, Any]:
    """A chain as the product serves it (`kq chain-status --json`, `GET /v1/chains/ID`):
    its record, and each step job written so far (`jobs`: `domain.Job`s or None)."""
    return {
        "chain_id": chain.id,
        "state": chain.state,
        "run": chain.run,
        "steps": chain.steps,
        "variants_per_step": list(chain.variants_per_step),
        "open_branches": chain.open_branches,
        "cancel_requested": chain.cancel_requested,
        "batch_id": chain.batch_id,
        "created_at": chain.created_at or None,
        "finished_at": chain.finished_at,
        "idempotency_key": chain.idempotency_key,
        "metadata": None if chain.metadata is None else dict(chain.metadata),
        "event_id": chain.event_id or None,
        "branches": [
            {
                "branch": e.branch,
                "state": e.state,
                "step": e.step,
                "job_id": e.job_id,
                "outputs": list(e.outputs),
                "reason": e.reason,
                "error": e.error,
            }
            for e in chain.ends
        ],
        "jobs": [
            {
                "job_id": job_id,
                "step": job.step if job else None,
                "branch": job.branch if job else None,
                "state": job.state.value if job else "expired",
                "outputs": list(job.outputs) if job else [],
                "reason": job.reason if job else "",
                "prediction_id": job.prediction_id if job else "",
            }
            for job_id, job in zip(chain.job_ids, jobs, strict=True)
        ],
    }
