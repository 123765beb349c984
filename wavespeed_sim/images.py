"""Output images: a real JPEG per prompt, so clients can download and decode results.

The picture is a two-colour gradient whose colours and direction come from a hash of the
prompt (the same prompt and aspect ratio always give the same bytes), with the prompt
written on it. Its size follows the request's `aspect_ratio` (`SIZES`: the ~1 megapixel
resolutions FLUX.1 Kontext answers with); without one ("follows input", and the
simulator never looks at the input) it is `WIDTH` x `HEIGHT`. Rendering takes a few
milliseconds (tens at a megapixel); the cache makes repeated downloads free.
"""

from __future__ import annotations

import functools
import hashlib
import io
import textwrap

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 512, 384
# aspect_ratio -> (width, height): FLUX.1 Kontext's preferred ~1 MP resolutions.
SIZES: dict[str, tuple[int, int]] = {
    "21:9": (1568, 672),
    "16:9": (1392, 752),
    "3:2": (1248, 832),
    "4:3": (1184, 880),
    "1:1": (1024, 1024),
    "3:4": (880, 1184),
    "2:3": (832, 1248),
    "9:16": (752, 1392),
    "9:21": (672, 1568),
}
CACHE_SIZE = 256  # distinct (prompt, ratio) pairs kept rendered (~30-150 KB each)


def output_size(aspect_ratio: str | None) -> tuple[int, int]:
    """(width, height) of the output for a request's aspect_ratio (None: the default)."""
    return SIZES.get(aspect_ratio or "", (WIDTH, HEIGHT))


def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # load_default(size=...) needs FreeType; fall back to the bitmap font without it.
    try:
        return ImageFont.load_default(size=18)
    except (ImportError, OSError):  # pragma: no cover - Pillow built without FreeType
        return ImageFont.load_default()


@functools.lru_cache(maxsize=CACHE_SIZE)
def render_output(prompt: str, aspect_ratio: str | None = None) -> bytes:
    """JPEG bytes of the output image for ``prompt`` at ``aspect_ratio``'s size."""
    width, height = output_size(aspect_ratio)
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    start, end = tuple(digest[0:3]), tuple(digest[3:6])
    angle = digest[6] % 360
    mask = Image.linear_gradient("L").rotate(angle, expand=False).resize((width, height))
    image = Image.composite(
        Image.new("RGB", (width, height), start),
        Image.new("RGB", (width, height), end),
        mask,
    )
    draw = ImageDraw.Draw(image)
    lines = textwrap.wrap(prompt, width=44)[:10] or [" "]
    text = "\n".join(lines)
    font = _font()
    left, top, right, bottom = draw.multiline_textbbox((20, 20), text, font=font)
    # A dark band behind the text keeps it legible whatever the gradient's colours.
    draw.rectangle((left - 8, top - 8, right + 8, bottom + 8), fill=(0, 0, 0))
    draw.multiline_text((20, 20), text, fill=(255, 255, 255), font=font)
    draw.text((20, height - 30), "wavespeed-sim", fill=(255, 255, 255), font=font)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
