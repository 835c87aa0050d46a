"""The drawing primitives every report picture shares, on Pillow alone: colours, text sizes, the
font, measured text, vertical text, round axis ticks, saving a PNG. heatmaps.py draws the heatmaps,
xy_charts.py the line and bar charts, compare_viz.py and explain_viz.py the image grids.

Every margin is measured from the text it must hold (font.getlength / getmetrics), so no
label is ever clipped; text is >= 14 px on a white background. Colours are module
constants so tests can look for them: GT captions are BLACK, a correct prediction GREEN,
a wrong one RED; CLIP and SigLIP keep the same colour in every chart.
"""
from __future__ import annotations

import functools
import math
import unicodedata
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
GREEN = (0, 140, 0)
RED = (200, 0, 0)
GRID_GREY = (225, 225, 225)
AXIS_GREY = (90, 90, 90)
FAINT_GREY = (150, 150, 150)

TITLE_PX, AXIS_TITLE_PX, TEXT_PX, CELL_TEXT_PX = 22, 18, 16, 14
MARGIN = 24
Box = tuple[int, int, int, int]  # left, top, right, bottom (right/bottom exclusive)


# ---------------------------------------------------------------------------- text


@functools.lru_cache(maxsize=None)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font (Pillow >= 10.1), else DejaVuSans from the system."""
    try:
        bundled = ImageFont.load_default(size=size)
        if isinstance(bundled, ImageFont.FreeTypeFont):
            return bundled
    except TypeError:  # Pillow < 10.1 has no size argument
        pass
    return ImageFont.truetype("DejaVuSans.ttf", size)


_NO_GLYPH = "\U0010fffd"  # a private-use code point: no font draws it, so its mask is the "missing" box


@functools.lru_cache(maxsize=None)
def _has_glyph(char: str, size: int) -> bool:
    return char.isspace() or bytes(font(size).getmask(char)) != bytes(font(size).getmask(_NO_GLYPH))


def drawable(text: str, size: int) -> str:
    """`text` with each character the font cannot draw replaced by its unaccented letter, else "?".

    Pillow's bundled font is ASCII only: "café dancing" is drawn as "cafe dancing", not with a box.
    """
    if text.isascii():
        return text
    out = []
    for char in text:
        if not _has_glyph(char, size):
            base = unicodedata.normalize("NFKD", char).encode("ascii", "ignore").decode()
            char = base if base and all(_has_glyph(c, size) for c in base) else "?"
        out.append(char)
    return "".join(out)


def text_width(text: str, size: int) -> int:
    return math.ceil(font(size).getlength(drawable(text, size)))


def line_height(size: int) -> int:
    ascent, descent = font(size).getmetrics()
    return ascent + descent


def display_name(class_name: str) -> str:
    return class_name.replace("_", " ")


def draw_text(draw: ImageDraw.ImageDraw, xy, text: str, size: int, fill=BLACK, anchor="la") -> None:
    draw.text(xy, drawable(text, size), font=font(size), fill=fill, anchor=anchor)


def paste_vertical_text(canvas: Image.Image, text: str, size: int, center_x: int, top: int | None = None,
                         center_y: int | None = None, fill=BLACK) -> Box:
    """Text rotated 90 degrees (read bottom to top), rendered on its own mask then pasted."""
    mask = Image.new("L", (text_width(text, size) + 2, line_height(size)), 0)
    ImageDraw.Draw(mask).text((1, 0), drawable(text, size), font=font(size), fill=255)
    mask = mask.rotate(90, expand=True)
    left = center_x - mask.width // 2
    top = center_y - mask.height // 2 if top is None else top
    canvas.paste(Image.new("RGB", mask.size, fill), (left, top), mask)
    return (left, top, left + mask.width, top + mask.height)


def save_png(image: Image.Image, path) -> Image.Image:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return image


# ---------------------------------------------------------------------------- axis ticks


def nice_ticks(lo: float, hi: float, max_ticks: int = 8) -> list[float]:
    """Round tick values (steps 1, 2, 2.5, 5 x 10^k) covering [lo, hi]."""
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / (max_ticks - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw - 1e-12)
    start = math.floor(lo / step + 1e-9) * step
    count = math.ceil((hi - start) / step - 1e-9)
    return [round(start + i * step, 12) for i in range(count + 1)]


def tick_decimals(ticks: Sequence[float]) -> int:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    digits = 0
    while digits < 6 and abs(round(step, digits) - step) > 1e-9 * max(abs(step), 1):
        digits += 1
    return digits
