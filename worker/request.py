"""Edit requests: the parameters of one Kontext edit, validated before anything is queued.

Pure (no I/O). Every check names the field and what was expected (see errors.FieldError).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from worker.errors import FieldError, ValidationError

# Limits taken from wavespeed-api.md ("Submit parameters").
SEED_MIN = -1
SEED_MAX = 2_147_483_647
GUIDANCE_MIN = 1.0
GUIDANCE_MAX = 20.0
ASPECT_RATIOS = ("21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21")
# The provider documents no maximum; these keep one bad producer from filling Redis.
MAX_PROMPT_CHARS = 4_000
MAX_URL_CHARS = 4_096
MAX_KEY_CHARS = 200
MODEL = "wavespeed-ai/flux-kontext-max"
PRICE_PER_IMAGE_USD = 0.08
PRICE_PER_IMAGE_MICROS = 80_000  # budgets are kept in integer micro-dollars

HEX32_RE = re.compile(r"^[0-9a-f]{32}$")


def job_id_for_key(idempotency_key: str) -> str:
    """The job id an idempotency key always maps to, so every producer agrees on it."""
    return hashlib.sha256(b"kq-idempotency:" + idempotency_key.encode()).hexdigest()[:32]


def is_job_id(value: str) -> bool:
    return bool(HEX32_RE.match(value))


_PLAIN_HTTP_URL = re.compile(r"https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:[/?#][!-~]*)?\Z")
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_KEY_RE = re.compile(r"^[A-Za-z0-9._:/@+=-]+$")
REQUEST_FIELDS = ("prompt", "image", "seed", "guidance_scale", "aspect_ratio")
ENVELOPE_FIELDS = ("batch_id", "idempotency_key", "priority")
PRIORITY_MIN, PRIORITY_MAX = -1000, 1000


@dataclass(frozen=True)
class EditRequest:
    """One validated edit: what a producer asks for, in the provider's own terms."""

    prompt: str
    image: str
    seed: int | None = None
    guidance_scale: float | None = None
    aspect_ratio: str | None = None

    def __post_init__(self) -> None:
        errors = _check_request(self)
        if errors:
            raise ValidationError(errors)

    @classmethod
    def from_dict(cls, data: object) -> EditRequest:
        """Build from untrusted JSON-like data; every bad or unknown field is reported."""
        if not isinstance(data, Mapping):
            raise ValidationError.single("request", f"expected a JSON object, got {kind_of(data)}")
        unknown = sorted(set(map(str, data)) - set(REQUEST_FIELDS) - set(ENVELOPE_FIELDS))
        errors = [
            FieldError(k, f"unknown field; allowed: {', '.join(REQUEST_FIELDS)}") for k in unknown
        ]
        for name in ("prompt", "image"):
            if name not in data or data[name] is None:
                errors.append(FieldError(name, "is required"))
        if errors:
            raise ValidationError(errors)
        return cls(
            prompt=data["prompt"],
            image=data["image"],
            seed=data.get("seed"),
            guidance_scale=data.get("guidance_scale"),
            aspect_ratio=data.get("aspect_ratio"),
        )

    def to_payload(self) -> dict[str, Any]:
        """The JSON body for the submit call; unset options are left to the provider."""
        payload: dict[str, Any] = {"prompt": self.prompt, "image": self.image}
        if self.seed is not None:
            payload["seed"] = self.seed
        if self.guidance_scale is not None:
            payload["guidance_scale"] = self.guidance_scale
        if self.aspect_ratio is not None:
            payload["aspect_ratio"] = self.aspect_ratio
        return payload


def kind_of(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _check_request(req: EditRequest) -> list[FieldError]:
    errors: list[FieldError] = []
    if not isinstance(req.prompt, str):
        errors.append(FieldError("prompt", f"expected a string, got {kind_of(req.prompt)}"))
    elif not req.prompt.strip():
        errors.append(FieldError("prompt", "must be a non-empty edit instruction"))
    elif len(req.prompt) > MAX_PROMPT_CHARS:
        errors.append(
            FieldError("prompt", f"is {len(req.prompt)} characters; at most {MAX_PROMPT_CHARS}")
        )
    elif "\x00" in req.prompt:
        errors.append(FieldError("prompt", "must not contain NUL characters"))
    elif _SURROGATE.search(req.prompt):
        # JSON can carry them ("\ud800"), but no UTF-8 request body can.
        errors.append(FieldError("prompt", "must be valid Unicode (no lone surrogates)"))
    url_error = check_http_url(req.image)
    if url_error:
        errors.append(FieldError("image", url_error))
    if req.seed is not None and (
        isinstance(req.seed, bool)
        or not isinstance(req.seed, int)
        or not SEED_MIN <= req.seed <= SEED_MAX
    ):
        errors.append(
            FieldError(
                "seed", f"expected an integer from {SEED_MIN} to {SEED_MAX}, got {req.seed!r}"
            )
        )
    g = req.guidance_scale
    if g is not None and (
        isinstance(g, bool)
        or not isinstance(g, int | float)
        # The range first: isfinite() overflows on an integer too large for a float.
        or not GUIDANCE_MIN <= g <= GUIDANCE_MAX
        or not math.isfinite(g)
    ):
        errors.append(
            FieldError(
                "guidance_scale",
                f"expected a number from {GUIDANCE_MIN} to {GUIDANCE_MAX}, got {g!r}",
            )
        )
    if req.aspect_ratio is not None and req.aspect_ratio not in ASPECT_RATIOS:
        errors.append(
            FieldError(
                "aspect_ratio",
                f"expected one of {', '.join(ASPECT_RATIOS)}, got {req.aspect_ratio!r}",
            )
        )
    return errors


def check_http_url(value: object) -> str | None:
    """Why `value` is not an absolute http(s) URL, or None when it is one."""
    if not isinstance(value, str):
        return f"expected an http(s) URL string, got {kind_of(value)}"
    if len(value) > MAX_URL_CHARS:
        return f"URL is {len(value)} characters; at most {MAX_URL_CHARS}"
    if _PLAIN_HTTP_URL.match(value):
        return None  # the common case, without urlsplit's cost (bulk files are 100k lines)
    if _SPACE_OR_CONTROL.search(value) or _SURROGATE.search(value):
        return "URL must not contain whitespace, control characters or lone surrogates"
    try:
        parts = urlsplit(value)
    except ValueError:
        return f"not a valid URL: {value[:80]!r}"
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"expected an http:// or https:// URL, got {value[:80]!r}"
    return None


def check_priority(value: object) -> int:
    """A job's priority: higher goes first within its batch; default 0."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError.single("priority", f"expected an integer, got {kind_of(value)}")
    if not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise ValidationError.single(
            "priority", f"expected {PRIORITY_MIN} to {PRIORITY_MAX}, got {value}"
        )
    return value


def check_key(field_name: str, value: object) -> str | None:
    """Validate an optional producer-chosen identifier (batch id, idempotency key)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_KEY_CHARS:
        raise ValidationError.single(
            field_name, f"expected a string of 1 to {MAX_KEY_CHARS} characters"
        )
    if not _KEY_RE.match(value):
        raise ValidationError.single(
            field_name, "may contain only letters, digits and . _ : / @ + = -"
        )
    return value
