"""The Kontext family on WaveSpeed, as data: each model's path, parameters, limits and price.

Pure (no I/O). A request names its model (`EditRequest.model`); validation, the submit
body and every price (budget reservation, cost) follow that model's entry here, so a new
sibling model is a new entry, not a new code path.

Sources: ../shared/design/wavespeed-api.md (the max models) and WaveSpeed's public model
pages (wavespeed.ai/docs/docs-api/wavespeed-ai/<model>), read in December 2026 through
the project's search of stored public pages. Nothing was checked against the live API.
Where the pages disagree or say nothing, the choice is written next to the entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

# The provider's aspect ratio list (the same on every Kontext page that has one).
ASPECT_RATIOS = ("21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21")
SEED_MIN = -1
SEED_MAX = 2_147_483_647
MICROS_PER_USD = 1_000_000


@dataclass(frozen=True)
class Model:
    """One provider model: what its submit call takes, within which limits, at what price."""

    path: str  # POST /api/v3/<path>; also the prediction's `model`
    price_micros: int  # per output image (one per task here), integer micro-dollars
    # 0: the model edits one `image` URL. N >= 1: it takes `images`, 1 to N URLs.
    max_images: int = 0
    seed: bool = True  # takes `seed` (SEED_MIN..SEED_MAX)
    guidance_min: float = 1.0
    guidance_max: float = 20.0
    aspect_ratio: bool = True  # takes `aspect_ratio` (one of ASPECT_RATIOS)

    @property
    def multi(self) -> bool:
        """True when the model takes `images` (a list) instead of `image`."""
        return self.max_images > 0

    @property
    def image_field(self) -> str:
        """The name of the required source-image field: `image` or `images`."""
        return "images" if self.multi else "image"

    @property
    def price_usd(self) -> float:
        return self.price_micros / MICROS_PER_USD

    @property
    def params(self) -> tuple[str, ...]:
        """The submit parameters this model takes (enable_sync_mode is never sent)."""
        names = ["prompt", self.image_field]
        if self.seed:
            names.append("seed")
        names.append("guidance_scale")
        if self.aspect_ratio:
            names.append("aspect_ratio")
        return tuple(names)


MAX = Model(
    # wavespeed-api.md ("Submit parameters"): $0.08 per image. Today's behaviour.
    path="wavespeed-ai/flux-kontext-max",
    price_micros=80_000,
)
MAX_MULTI = Model(
    # wavespeed-api.md: `images` instead of `image`, no `seed`; the provider's page agrees
    # (no seed in its table), says "up to 5 reference images" and $0.08 per image.
    path="wavespeed-ai/flux-kontext-max/multi",
    price_micros=80_000,
    max_images=5,
    seed=False,
)
PRO = Model(
    # The provider's page lists only prompt, image, guidance_scale (1.0 to 10.0, narrower
    # than max's 20.0) and safety_tolerance: no seed, no aspect_ratio. We follow that page
    # and refuse seed/aspect_ratio for pro rather than send what it may ignore; we do not
    # offer safety_tolerance (the provider's default "2" applies), as for max.
    # Price: the page names none; WaveSpeed prices pro/multi and pro/text-to-image at
    # $0.04 per image and BFL lists Kontext [pro] at $0.04, so $0.04 it is.
    path="wavespeed-ai/flux-kontext-pro",
    price_micros=40_000,
    seed=False,
    guidance_max=10.0,
    aspect_ratio=False,
)
PRO_MULTI = Model(
    # The provider's page: prompt, images ("up to 5 reference images"), seed (-1 to
    # 2147483647; unlike max/multi it has one), guidance_scale 1.0 to 20.0, aspect_ratio;
    # $0.04 per image.
    path="wavespeed-ai/flux-kontext-pro/multi",
    price_micros=40_000,
    max_images=5,
)

# Every model a job may name, by path, default first.
MODELS: Mapping[str, Model] = MappingProxyType(
    {m.path: m for m in (MAX, MAX_MULTI, PRO, PRO_MULTI)}
)
DEFAULT_MODEL = MAX


def lookup(path: object) -> Model | None:
    """The registry entry for `path`, or None for anything else."""
    return MODELS.get(path) if isinstance(path, str) else None


def known_models() -> str:
    """The registered paths, for error messages."""
    return ", ".join(MODELS)


def average_price_micros(jobs: int, micros: int) -> int:
    """The mean price of `jobs` tasks that together cost `micros` (the default model's
    price when nothing was priced yet, e.g. counters written before models existed).

    Cost is `paid x this`: the job records count paid tasks (a Lua counter) but not their
    price, so a batch's or the account's cost uses the mean price of its priced jobs;
    exact whenever they are all of one model."""
    if jobs <= 0 or micros <= 0:
        return DEFAULT_MODEL.price_micros
    return round(micros / jobs)
