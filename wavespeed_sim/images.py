"""Output images: a real JPEG per prompt, so clients can download and decode results.

The picture is a two-colour gradient whose colours and direction come from a hash of the
prompt (the same prompt always gives the same bytes), with the prompt written on it.
Rendering takes a few milliseconds; the cache makes repeated downloads free.
"""

from __future__ import annotations

import functools
import hashlib
import io
import textwrap

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 512, 384
CACHE_SIZE = 256  # distinct prompts kept rendered (~30 KB each)


def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # load_default(size=...) needs FreeType; fall back to the bitmap font without it.
    try:
        return ImageFont.load_default(size=18)
    except (ImportError, OSError):  # pragma: no cover - Pillow built without FreeType
        return ImageFont.load_default()


@functools.lru_cache(maxsize=CACHE_SIZE)
def render_output(prompt: str) -> bytes:
    """JPEG bytes of the output image for ``prompt``."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    start, end = tuple(digest[0:3]), tuple(digest[3:6])
    angle = digest[6] % 360
    mask = Image.linear_gradient("L").rotate(angle, expand=False).resize((WIDTH, HEIGHT))
    image = Image.composite(
        Image.new("RGB", (WIDTH, HEIGHT), start),
        Image.new("RGB", (WIDTH, HEIGHT), end),
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
    draw.text((20, HEIGHT - 30), "wavespeed-sim", fill=(255, 255, 255), font=font)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
