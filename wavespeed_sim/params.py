"""Validation of request bodies, exactly per the spec's parameter table, per model.

Every error is a ``ParamError`` whose message starts with the field's name, so a client
(and a test) can tell which field was wrong. JSON ``null`` for an optional field counts
as "not given"; ``true``/``false`` never count as numbers; unknown fields are ignored.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from wavespeed_sim.config import MODEL, MODEL_MULTI

ASPECT_RATIOS = ("21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21")
SEED_MIN, SEED_MAX = -1, 2_147_483_647
GUIDANCE_MIN, GUIDANCE_MAX = 1.0, 20.0
MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 20
MODEL_PRO = "wavespeed-ai/flux-kontext-pro"
MODEL_PRO_MULTI = "wavespeed-ai/flux-kontext-pro/multi"


@dataclass(frozen=True)
class SimModel:
    """One model the simulated provider serves: the parameters it reads, and its price."""

    path: str
    list_price: float  # dollars per image at the provider's list prices
    max_images: int = 0  # 0: reads `image`; N: reads `images`, 1 to N URLs
    seed: bool = True  # reads `seed` (a model that does not ignores it, like any unknown)
    guidance_max: float = GUIDANCE_MAX
    aspect_ratio: bool = True


# The Kontext family as the *provider* documents it (wavespeed-api.md and WaveSpeed's public
# model pages). This table mirrors the provider, not the client's registry (worker/models.py,
# which the simulator must not import): were the two to disagree, the simulator should keep
# answering as the provider does, and the client's tests would show the difference.
SIM_MODELS: dict[str, SimModel] = {
    m.path: m
    for m in (
        SimModel(MODEL, 0.08),
        SimModel(MODEL_MULTI, 0.08, max_images=5, seed=False),
        SimModel(MODEL_PRO, 0.04, seed=False, guidance_max=10.0, aspect_ratio=False),
        SimModel(MODEL_PRO_MULTI, 0.04, max_images=5),
    )
}


def price_of(model: str, max_price: float) -> float:
    """Dollars debited per image of ``model`` when a Kontext [max] image costs ``max_price``
    (the ``--price`` knob): each model keeps its list price's ratio to [max]'s."""
    return max_price * SIM_MODELS[model].list_price / SIM_MODELS[MODEL].list_price


def inputs_of(params: dict[str, object]) -> list[str]:
    """The source image URLs of accepted params (``image`` or ``images``)."""
    images = params.get("images")
    if isinstance(images, list):
        return [str(url) for url in images]
    image = params.get("image")
    return [image] if isinstance(image, str) else []


class ParamError(ValueError):
    """A request body field is missing or wrong; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _show(value: object) -> str:
    """A short repr for error messages (never echo a huge value back)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_http_url(value: object) -> bool:
    """True for an absolute http(s) URL with a host."""
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme in {"http", "https"} and bool(parts.netloc)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def validate_submit(model: str, body: object) -> dict[str, object]:
    """Check a submit body for ``model``; return the accepted params (unknown ones, and
    those the model does not read, dropped)."""
    spec = SIM_MODELS[model]
    if not isinstance(body, dict):
        raise ParamError("body", "must be a JSON object")
    params: dict[str, object] = {}

    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ParamError("prompt", f"required, a non-empty string; got {_show(prompt)}")
    params["prompt"] = prompt

    if spec.max_images:
        images = body.get("images")
        if not isinstance(images, list) or not images:
            raise ParamError("images", f"required, a non-empty array of URLs; got {_show(images)}")
        if len(images) > spec.max_images:
            raise ParamError("images", f"at most {spec.max_images} images; got {len(images)} URLs")
        for index, url in enumerate(images):
            if not is_http_url(url):
                raise ParamError(f"images[{index}]", f"must be an http(s) URL; got {_show(url)}")
        params["images"] = list(images)
    else:
        image = body.get("image")
        if not is_http_url(image):
            raise ParamError("image", f"required, an http(s) URL string; got {_show(image)}")
        params["image"] = image
    seed = body.get("seed")
    if seed is not None and spec.seed:
        if not _is_int(seed) or not SEED_MIN <= seed <= SEED_MAX:
            raise ParamError(
                "seed", f"must be an integer from {SEED_MIN} to {SEED_MAX}; got {_show(seed)}"
            )
        params["seed"] = seed

    guidance = body.get("guidance_scale")
    if guidance is not None:
        if not _is_number(guidance) or not GUIDANCE_MIN <= guidance <= spec.guidance_max:
            raise ParamError(
                "guidance_scale",
                f"must be a number from {GUIDANCE_MIN} to {spec.guidance_max}; "
                f"got {_show(guidance)}",
            )
        params["guidance_scale"] = guidance

    ratio = body.get("aspect_ratio")
    if ratio is not None and spec.aspect_ratio:
        if ratio not in ASPECT_RATIOS:
            raise ParamError(
                "aspect_ratio", f"must be one of {', '.join(ASPECT_RATIOS)}; got {_show(ratio)}"
            )
        params["aspect_ratio"] = ratio

    sync = body.get("enable_sync_mode")
    if sync is not None:
        if not isinstance(sync, bool):
            raise ParamError("enable_sync_mode", f"must be true or false; got {_show(sync)}")
        params["enable_sync_mode"] = sync
    return params


def validate_webhook(value: str | None) -> str | None:
    """The ``webhook`` query parameter: absent, or an http(s) URL kept exactly as given."""
    if value is None or value == "":
        return None
    if not is_http_url(value):
        raise ParamError("webhook", f"must be an http(s) URL (URL-encoded); got {_show(value)}")
    return value


_ISO_FRACTION = re.compile(r"\.(\d+)")


def parse_iso_ns(field: str, value: object) -> int:
    """Parse an ISO-8601 time (any fraction length, ``Z`` or offset) to epoch nanoseconds.

    A time without a zone is taken as UTC.
    """
    if not isinstance(value, str):
        raise ParamError(field, f"must be an ISO-8601 time string; got {_show(value)}")
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    nanos = 0
    match = _ISO_FRACTION.search(text)
    if match:
        digits = match.group(1)
        nanos = int((digits + "000000000")[:9])
        text = text[: match.start()] + text[match.end() :]
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ParamError(field, f"must be an ISO-8601 time string; got {_show(value)}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return int(parsed.timestamp()) * 1_000_000_000 + nanos


@dataclass(frozen=True)
class ListQuery:
    """A validated ``POST /api/v3/predictions`` body."""

    page: int = 1
    page_size: int = DEFAULT_PAGE_SIZE
    model: str | None = None
    status: str | None = None
    created_after_ns: int | None = None
    created_before_ns: int | None = None


def validate_list(body: object) -> ListQuery:
    """Check a list body; every field optional."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise ParamError("body", "must be a JSON object")
    page = body.get("page", 1)
    if page is None:
        page = 1
    if not _is_int(page) or page < 1:
        raise ParamError("page", f"must be an integer >= 1; got {_show(page)}")
    size = body.get("page_size", DEFAULT_PAGE_SIZE)
    if size is None:
        size = DEFAULT_PAGE_SIZE
    if not _is_int(size) or not 1 <= size <= MAX_PAGE_SIZE:
        raise ParamError(
            "page_size", f"must be an integer from 1 to {MAX_PAGE_SIZE}; got {_show(size)}"
        )
    texts: dict[str, str | None] = {}
    for name in ("model", "status"):
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            raise ParamError(name, f"must be a string; got {_show(value)}")
        texts[name] = value or None
    after = body.get("created_after")
    before = body.get("created_before")
    return ListQuery(
        page=page,
        page_size=size,
        model=texts["model"],
        status=texts["status"],
        created_after_ns=None if after in (None, "") else parse_iso_ns("created_after", after),
        created_before_ns=None if before in (None, "") else parse_iso_ns("created_before", before),
    )


def validate_delete(body: object) -> list[str]:
    """Check a delete body: ``{"ids": [string, ...]}``."""
    if not isinstance(body, dict):
        raise ParamError("body", "must be a JSON object")
    ids = body.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ParamError("ids", f"required, an array of prediction id strings; got {_show(ids)}")
    return list(ids)
