"""What a producer hands in, checked before anything is written: items (an edit plus
its idempotency key, priority and metadata), image URLs, metadata objects, budgets."""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from worker.domain import (
    REQUEST_FIELDS,
    EditRequest,
    check_key,
    check_priority,
    job_id_for_key,
    kind_of,
)
from worker.errors import FieldError, ValidationError
from worker.models import lookup
from worker.request import model_of, plain_edit_ok, required_message

# The producer's metadata object, as compact UTF-8 JSON, at most this many bytes.
MAX_METADATA_BYTES = 4096
# A budget above this is a typo, not a plan (and must stay exact in micro-dollars).
MAX_BUDGET_USD = 1_000_000_000
# What an item may carry beside the edit itself (`batch_id` only where the caller says).
ITEM_ENVELOPE_FIELDS = ("idempotency_key", "priority", "metadata")
_PLACEHOLDER_PROMPT = "-"
_PLACEHOLDER_IMAGE = "https://example.invalid/"
# The form of an image URL every producer's item must have: http(s), an ASCII host (IDN in
# punycode; no IPv6 literal), then any path, query or fragment without white space or
# control characters (non-ASCII is fine; lone surrogates are refused by EditRequest, and
# are left out here because JSON Schema regex engines cannot name them). docs/openapi.yaml
# states the same pattern, so the HTTP API's description and behaviour cannot drift apart.
_URL_SPACE = (
    "\\u0000-\\u0020\\u007f\\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
)
_URL_HOST = "\\u0021\\u0022\\u0024-\\u002e\\u0030-\\u003e\\u0040-\\u005a\\u005c\\u005e-\\u007e"
IMAGE_URL_PATTERN = f"^https?://[{_URL_HOST}]+([/?#][^{_URL_SPACE}]*)?$"
_IMAGE_URL = re.compile(IMAGE_URL_PATTERN)


def new_job_id() -> str:
    return uuid.uuid4().hex


def new_batch_id() -> str:
    return f"b-{uuid.uuid4().hex[:16]}"


@dataclass(frozen=True)
class Item:
    """One request to enqueue, with its optional idempotency key, priority and metadata."""

    request: EditRequest
    idempotency_key: str = ""
    priority: int = 0
    # Fixed at creation: derived from the key, or a fresh id when there is none.
    job_id: str = field(default="", compare=False)
    # The producer's own JSON object (checked by `check_metadata`), or None.
    metadata: Mapping[str, Any] | None = field(default=None, hash=False)

    # Written out (the dataclass keeps it): one __dict__ update instead of a frozen
    # setattr per field (a batch file makes 100,000 items).
    def __init__(
        self,
        request: EditRequest,
        idempotency_key: str = "",
        priority: int = 0,
        job_id: str = "",
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if not job_id:
            job_id = job_id_for_key(idempotency_key) if idempotency_key else new_job_id()
        self.__dict__.update(
            request=request,
            idempotency_key=idempotency_key,
            priority=priority,
            job_id=job_id,
            metadata=metadata,
        )

    @classmethod
    def coerce(cls, value: Item | EditRequest | Mapping[str, object]) -> Item:
        """Accept an Item, an EditRequest or a JSON-like mapping (validated; a mapping
        may also carry `batch_id`, which is the caller's to read)."""
        if isinstance(value, Item):
            return value
        if isinstance(value, EditRequest):
            return cls(value)
        return item_from_dict(value, envelope=("batch_id", *ITEM_ENVELOPE_FIELDS))


def item_from_dict(
    data: object,
    *,
    envelope: Sequence[str] = ITEM_ENVELOPE_FIELDS,
    refused: Mapping[str, str] | None = None,
) -> Item:
    """Validate one JSON-like item; a ValidationError names every bad field at once.

    `envelope`: the fields accepted beside the edit's own (REQUEST_FIELDS); an unknown
    field's error lists all accepted ones. `refused`: fields refused with their own message
    (e.g. `batch_id` on a batch line).
    """
    request, key, priority, metadata = item_parts(data, envelope=envelope, refused=refused)
    return Item(request, key, priority, metadata=metadata)


# What `item_parts` gives: the request, idempotency key ('' for none), priority, metadata.
ItemParts = tuple[EditRequest, str, int, dict[str, Any] | None]
# A single-image edit with only these fields (the usual bulk line) is checked by the
# short path of `item_parts`; anything else, or anything it doubts, takes the full one.
_SHORT_FIELDS = frozenset(
    ("prompt", "image", "seed", "guidance_scale", "aspect_ratio", *ITEM_ENVELOPE_FIELDS)
)


def plain_item(data: object) -> tuple[str, str] | None:
    """The prompt and image of the usual bulk line, a JSON object of just those two when
    both are plainly valid; else None, and `item_parts` decides. Accepts only what
    `item_parts` accepts (so `EditRequest.plain` makes its request unchecked)."""
    if type(data) is not dict or len(data) != 2:
        return None
    prompt, image = data.get("prompt"), data.get("image")
    if type(image) is str and _IMAGE_URL.fullmatch(image) and plain_edit_ok(prompt, image):
        return prompt, image  # type: ignore[return-value]  # both are str (plain_edit_ok)
    return None


def item_parts(
    data: object,
    *,
    envelope: Sequence[str] = ITEM_ENVELOPE_FIELDS,
    refused: Mapping[str, str] | None = None,
) -> ItemParts:
    """`item_from_dict` without making the Item (nor so its job id): a batch file is
    checked line by line first, and its items then get keys of their own."""
    if type(data) is dict and data.keys() <= _SHORT_FIELDS:
        parts = _short_parts(data, envelope, refused)
        if parts is not None:
            return parts
    return _full_parts(data, envelope, refused)


def _short_parts(
    data: dict[str, Any], envelope: Sequence[str], refused: Mapping[str, str] | None
) -> ItemParts | None:
    """The parts of a valid single-image edit of the default model, at a fraction of the
    full path's cost (100,000-line files); None when anything is off, and the full path
    then names every problem. Accepts exactly what `_full_parts` accepts."""
    image = data.get("image")
    if type(image) is not str or not _IMAGE_URL.fullmatch(image):
        return None
    plain = len(data) == 2  # prompt and image (both present: the image is, and 2 keys)
    if not plain:
        if refused and not refused.keys().isdisjoint(data):
            return None
        if any(name not in envelope for name in ITEM_ENVELOPE_FIELDS if name in data):
            return None
    try:
        if plain:
            request = EditRequest(prompt=data.get("prompt"), image=image)  # type: ignore[arg-type]
            return request, "", 0, None
        request = EditRequest(
            prompt=data.get("prompt"),  # type: ignore[arg-type]  # checked by EditRequest
            image=image,
            seed=data.get("seed"),
            guidance_scale=data.get("guidance_scale"),
            aspect_ratio=data.get("aspect_ratio"),
        )
        key = check_key("idempotency_key", data.get("idempotency_key"))
        priority = check_priority(data.get("priority"))
        metadata = check_metadata(data.get("metadata"))
    except ValidationError:
        return None
    return request, key or "", priority, metadata


def _full_parts(
    data: object, envelope: Sequence[str], refused: Mapping[str, str] | None
) -> ItemParts:
    if not isinstance(data, Mapping):
        raise ValidationError.single("request", f"expected a JSON object, got {kind_of(data)}")
    allowed = (*REQUEST_FIELDS, *envelope)
    errors: list[FieldError] = []
    for name in sorted(map(str, data)):
        if refused and name in refused:
            errors.append(FieldError(name, refused[name]))
        elif name not in allowed:
            errors.append(FieldError(name, f"unknown field; allowed: {', '.join(allowed)}"))
    # `image` or `images`, as the model (default Kontext [max]) takes.
    model = lookup(model_of(data))
    image_field = "image" if model is None else model.image_field
    missing = [name for name in ("prompt", image_field) if data.get(name) is None]
    errors.extend(
        FieldError(name, "is required" if model is None else required_message(model))
        if name == image_field
        else FieldError(name, "is required")
        for name in missing
    )
    request: EditRequest | None = None
    try:
        # A missing prompt or image stands in as a valid one, so that the other
        # fields are still checked and every problem of the item is named together.
        request = EditRequest(
            prompt=_PLACEHOLDER_PROMPT if "prompt" in missing else data["prompt"],
            image=_PLACEHOLDER_IMAGE if "image" in missing else data.get("image"),
            seed=data.get("seed"),
            guidance_scale=data.get("guidance_scale"),
            aspect_ratio=data.get("aspect_ratio"),
            model=model_of(data),
            images=(_PLACEHOLDER_IMAGE,) if "images" in missing else _listed(data.get("images")),
        )
    except ValidationError as exc:
        errors.extend(exc.errors)
    image, images = data.get("image"), data.get("images")
    # fullmatch: `$` alone would let a final newline through.
    if (
        isinstance(image, str)
        and not any(e.field == "image" for e in errors)
        and not _IMAGE_URL.fullmatch(image)
    ):
        errors.append(FieldError("image", _URL_FORM + f"got {image[:80]!r}"))
    if isinstance(images, list) and not any(e.field == "images" for e in errors):
        errors.extend(
            FieldError("images", f"item {i}: " + _URL_FORM + f"got {url[:80]!r}")
            for i, url in enumerate(images)
            if isinstance(url, str) and not _IMAGE_URL.fullmatch(url)
        )
    key = priority = metadata = None
    try:
        key = check_key("idempotency_key", data.get("idempotency_key"))
    except ValidationError as exc:
        errors.extend(exc.errors)
    try:
        priority = check_priority(data.get("priority"))
    except ValidationError as exc:
        errors.extend(exc.errors)
    try:
        metadata = check_metadata(data.get("metadata"))
    except ValidationError as exc:
        errors.extend(exc.errors)
    if errors or request is None:
        raise ValidationError(errors)
    return request, key or "", priority or 0, metadata


_URL_FORM = (
    "expected http:// or https://, an ASCII host (user:password@ and :port "
    "allowed; IDN in punycode; no IPv6 literal), then an optional path; "
)


def _listed(value: object) -> Any:
    """A JSON array of `images` as the tuple a request keeps (anything else as it is, for
    the request to refuse by name)."""
    return tuple(value) if isinstance(value, list) else value


def check_metadata(value: object) -> dict[str, Any] | None:
    """The producer's metadata: a JSON object of at most MAX_METADATA_BYTES as compact
    UTF-8 JSON (None when absent). Returns a plain copy."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValidationError.single("metadata", f"expected a JSON object, got {kind_of(value)}")
    try:
        text = json.dumps(dict(value), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValidationError.single("metadata", f"must be plain JSON ({exc})") from None
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValidationError.single(
            "metadata", "must be valid Unicode (no lone surrogates)"
        ) from None
    if size > MAX_METADATA_BYTES:
        raise ValidationError.single(
            "metadata", f"is {size} bytes as JSON; at most {MAX_METADATA_BYTES}"
        )
    copy: dict[str, Any] = json.loads(text)
    return copy


def check_budget(value: object, field_name: str = "budget") -> float | None:
    """A batch budget in USD: 0 to MAX_BUDGET_USD (None: no budget)."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        # The range first: isfinite() overflows on an integer too large for a float.
        or not 0 <= value <= MAX_BUDGET_USD
        or not math.isfinite(value)
    ):
        raise ValidationError.single(
            field_name, f"expected an amount in USD from 0 to {MAX_BUDGET_USD:,}, got {value!r}"
        )
    return float(value)
