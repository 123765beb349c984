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

from worker import models
from worker.errors import FieldError, ValidationError
from worker.models import DEFAULT_MODEL, MODELS, Model, lookup

# Limits taken from wavespeed-api.md ("Submit parameters"); per model in worker.models.
SEED_MIN = models.SEED_MIN
SEED_MAX = models.SEED_MAX
ASPECT_RATIOS = models.ASPECT_RATIOS
GUIDANCE_MIN = DEFAULT_MODEL.guidance_min
GUIDANCE_MAX = DEFAULT_MODEL.guidance_max
# The provider documents no maximum; these keep one bad producer from filling Redis.
MAX_PROMPT_CHARS = 4_000
MAX_URL_CHARS = 4_096
MAX_KEY_CHARS = 200
# The default model (Kontext [max]) and its price; a job's own price is
# `EditRequest.price_micros` (budgets are kept in integer micro-dollars).
MODEL = DEFAULT_MODEL.path
PRICE_PER_IMAGE_USD = DEFAULT_MODEL.price_usd
PRICE_PER_IMAGE_MICROS = DEFAULT_MODEL.price_micros

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
REQUEST_FIELDS = ("prompt", "image", "images", "model", "seed", "guidance_scale", "aspect_ratio")
ENVELOPE_FIELDS = ("batch_id", "idempotency_key", "priority")
PRIORITY_MIN, PRIORITY_MAX = -1000, 1000


@dataclass(frozen=True)
class EditRequest:
    """One validated edit: what a producer asks for, in the provider's own terms.

    `model` names a `worker.models` entry (default Kontext [max]); a single-image model
    edits `image`, a /multi model takes `images` (a tuple of URLs) and no `image`.
    """

    prompt: str
    image: str | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    aspect_ratio: str | None = None
    model: str = MODEL
    images: tuple[str, ...] | None = None

    # Written out (the dataclass keeps it): one __dict__ update instead of a frozen
    # setattr per field, a third of the cost of making a request (100,000-line batches).
    def __init__(
        self,
        prompt: str,
        image: str | None = None,
        seed: int | None = None,
        guidance_scale: float | None = None,
        aspect_ratio: str | None = None,
        model: str = MODEL,
        images: tuple[str, ...] | None = None,
    ) -> None:
        if isinstance(images, list):
            # Callers may pass a list; a frozen request keeps (and hashes) a tuple.
            images = tuple(images)
        self.__dict__.update(
            prompt=prompt,
            image=image,
            seed=seed,
            guidance_scale=guidance_scale,
            aspect_ratio=aspect_ratio,
            model=model,
            images=images,
        )
        errors = _check_request(self)
        if errors:
            raise ValidationError(errors)

    @classmethod
    def plain(cls, prompt: str, image: str) -> EditRequest:
        """The request for a prompt and image `plain_edit_ok` passed, not checked again
        (a 100,000-line file is checked once, then written)."""
        request = cls.__new__(cls)
        request.__dict__.update(_PLAIN_FIELDS, prompt=prompt, image=image)
        return request

    @property
    def is_plain(self) -> bool:
        """The usual edit: a prompt and one image for the default model, no options."""
        return (
            self.model == MODEL
            and self.image is not None
            and self.seed is None
            and self.guidance_scale is None
            and self.aspect_ratio is None
            and self.images is None
        )

    @property
    def spec(self) -> Model:
        """The model's registry entry (always found: validation refused unknown models)."""
        return MODELS[self.model]

    @property
    def price_micros(self) -> int:
        """What one task of this request costs, in micro-dollars (its model's price)."""
        return self.spec.price_micros

    @property
    def price_usd(self) -> float:
        return self.spec.price_usd

    @property
    def inputs(self) -> tuple[str, ...]:
        """The source image URLs, whichever field carries them."""
        return self.images if self.images is not None else (self.image or "",)

    @classmethod
    def from_dict(cls, data: object) -> EditRequest:
        """Build from untrusted JSON-like data; every bad or unknown field is reported.

        A request without `model` (every job stored before models existed) is Kontext [max].
        """
        if not isinstance(data, Mapping):
            raise ValidationError.single("request", f"expected a JSON object, got {kind_of(data)}")
        unknown = sorted(set(map(str, data)) - set(REQUEST_FIELDS) - set(ENVELOPE_FIELDS))
        errors = [
            FieldError(k, f"unknown field; allowed: {', '.join(REQUEST_FIELDS)}") for k in unknown
        ]
        if data.get("prompt") is None:
            errors.append(FieldError("prompt", "is required"))
            # Otherwise the constructor names a missing image together with the rest.
            model = lookup(model_of(data))
            if model is not None and data.get(model.image_field) is None:
                errors.append(FieldError(model.image_field, required_message(model)))
        if errors:
            raise ValidationError(errors)
        images = data.get("images")
        return cls(
            prompt=data["prompt"],
            image=data.get("image"),
            seed=data.get("seed"),
            guidance_scale=data.get("guidance_scale"),
            aspect_ratio=data.get("aspect_ratio"),
            model=model_of(data),
            images=tuple(images) if isinstance(images, list | tuple) else images,
        )

    def to_dict(self) -> dict[str, Any]:
        """The request as JSON (what a job record stores; `from_dict` reads it back).
        `model` is left out for the default model, so such records read as before."""
        data: dict[str, Any] = {"prompt": self.prompt}
        if self.model != MODEL:
            data["model"] = self.model
        if self.images is not None:
            data["images"] = list(self.images)
        else:
            data["image"] = self.image
        self._options(data)
        return data

    # The stored form keeps its historical name (JobStore writes `to_payload()`).
    to_payload = to_dict

    def submit_body(self) -> dict[str, Any]:
        """The JSON body for the submit call to the model's path: only the parameters that
        model takes (the model itself is in the path); unset options are left to the
        provider."""
        body: dict[str, Any] = {"prompt": self.prompt}
        if self.spec.multi:
            body["images"] = list(self.images or ())
        else:
            body["image"] = self.image
        self._options(body)
        return body

    def _options(self, data: dict[str, Any]) -> None:
        if self.seed is not None:
            data["seed"] = self.seed
        if self.guidance_scale is not None:
            data["guidance_scale"] = self.guidance_scale
        if self.aspect_ratio is not None:
            data["aspect_ratio"] = self.aspect_ratio


# What `EditRequest.plain` sets beside the prompt and image: every option unset.
_PLAIN_FIELDS = {
    "seed": None,
    "guidance_scale": None,
    "aspect_ratio": None,
    "model": MODEL,
    "images": None,
}


def plain_edit_ok(prompt: object, image: object) -> bool:
    """Whether a prompt and image make a plainly valid edit of the default model with no
    options, by a quick check for bulk files: True only where EditRequest accepts them
    too; False means "not sure", and EditRequest then decides (naming any problem)."""
    return (
        type(prompt) is str
        and type(image) is str
        and 0 < len(prompt) <= MAX_PROMPT_CHARS
        and len(image) <= MAX_URL_CHARS
        and not prompt.isspace()
        and "\x00" not in prompt
        and (prompt.isascii() or _SURROGATE.search(prompt) is None)
        and _PLAIN_HTTP_URL.match(image) is not None
    )


def model_of(data: Mapping[str, Any]) -> Any:
    """The `model` a JSON-like request names; absent or null means the default (stored
    requests from before models existed have none)."""
    value = data.get("model")
    return MODEL if value is None else value


def required_message(model: Model) -> str:
    """What a missing source image field of `model` is told."""
    if model.multi:
        return f"is required by {model.path}: an array of 1 to {model.max_images} image URLs"
    return "is required"


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
    model = lookup(req.model)
    if model is None:
        shown = repr(req.model) if isinstance(req.model, str) else kind_of(req.model)
        errors.append(
            FieldError("model", f"unknown model {shown[:100]}; known: {', '.join(MODELS)}")
        )
        return errors  # the other fields' limits depend on the model
    errors.extend(_check_images(req, model))
    for name, value, taken in (
        ("seed", req.seed, model.seed),
        ("aspect_ratio", req.aspect_ratio, model.aspect_ratio),
    ):
        if value is not None and not taken:
            errors.append(FieldError(name, f"not taken by {model.path}; {_takes(model)}"))
    if (
        model.seed
        and req.seed is not None
        and (
            isinstance(req.seed, bool)
            or not isinstance(req.seed, int)
            or not SEED_MIN <= req.seed <= SEED_MAX
        )
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
        or not model.guidance_min <= g <= model.guidance_max
        or not math.isfinite(g)
    ):
        which = "" if model is DEFAULT_MODEL else f" for {model.path}"
        errors.append(
            FieldError(
                "guidance_scale",
                f"expected a number from {model.guidance_min} to {model.guidance_max}{which}, "
                f"got {g!r}",
            )
        )
    if (
        model.aspect_ratio
        and req.aspect_ratio is not None
        and req.aspect_ratio not in ASPECT_RATIOS
    ):
        errors.append(
            FieldError(
                "aspect_ratio",
                f"expected one of {', '.join(ASPECT_RATIOS)}, got {req.aspect_ratio!r}",
            )
        )
    return errors


def _check_images(req: EditRequest, model: Model) -> list[FieldError]:
    """The source image field the model takes, and refusal of the one it does not."""
    if not model.multi:
        errors = []
        if req.images is not None:
            multi_paths = ", ".join(m.path for m in MODELS.values() if m.multi)
            errors.append(
                FieldError(
                    "images",
                    f"not taken by {model.path}, which edits one `image`; "
                    f"several source images need a multi-image model ({multi_paths})",
                )
            )
        if req.image is None:
            errors.append(FieldError("image", required_message(model)))
        else:
            url_error = check_http_url(req.image)
            if url_error:
                errors.append(FieldError("image", url_error))
        return errors
    errors = []
    if req.image is not None:
        errors.append(
            FieldError(
                "image",
                f"not taken by {model.path}; give the source images as `images`, "
                f"an array of 1 to {model.max_images} URLs",
            )
        )
    images = req.images
    expected = f"expected an array of 1 to {model.max_images} http(s) URLs"
    if images is None:
        errors.append(FieldError("images", required_message(model)))
    elif not isinstance(images, tuple):
        errors.append(FieldError("images", f"{expected}, got {kind_of(images)}"))
    elif not 1 <= len(images) <= model.max_images:
        errors.append(FieldError("images", f"{expected} for {model.path}, got {len(images)} URLs"))
    else:
        for index, url in enumerate(images):
            url_error = check_http_url(url)
            if url_error:
                errors.append(FieldError("images", f"item {index}: {url_error}"))
    return errors


def _takes(model: Model) -> str:
    return f"it takes {', '.join(model.params)}"


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
