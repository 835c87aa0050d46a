"""Report pictures drawn with Pillow alone: confusion heatmaps, loss and epoch-time charts,
reliability diagrams and prompt-ablation heatmaps (compare_viz.py draws the image grids).

Every margin is measured from the text it must hold (font.getlength / getmetrics), so no
label is ever clipped; text is >= 14 px on a white background. Colours are module
constants so tests can look for them: GT captions are BLACK, a correct prediction GREEN,
a wrong one RED; CLIP and SigLIP keep the same colour in every chart.
"""
from __future__ import annotations

import functools
import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
GREEN = (0, 140, 0)
RED = (200, 0, 0)
GRID_GREY = (225, 225, 225)
AXIS_GREY = (90, 90, 90)
FAINT_GREY = (150, 150, 150)
CLIP_COLOR = (31, 119, 180)  # blue
SIGLIP_COLOR = (230, 110, 0)  # orange
EXTRA_COLORS = ((44, 160, 44), (148, 103, 189), (140, 86, 75), (227, 119, 194))

TITLE_PX, AXIS_TITLE_PX, TEXT_PX, CELL_TEXT_PX = 22, 18, 16, 14
MARGIN = 24
# matplotlib's "Blues" anchors: luminance falls monotonically, so darker always means larger.
_BLUES = np.array(
    [(247, 251, 255), (222, 235, 247), (198, 219, 239), (158, 202, 225), (107, 174, 214),
     (66, 146, 198), (33, 113, 181), (8, 81, 156), (8, 48, 107)], dtype=np.float64,
)
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


def _paste_vertical_text(canvas: Image.Image, text: str, size: int, center_x: int, top: int | None = None,
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


# ---------------------------------------------------------------------------- heatmaps


def colormap(t: float) -> tuple[int, int, int]:
    """Blues colour for t in [0, 1], linear between the anchors."""
    pos = min(max(float(t), 0.0), 1.0) * (len(_BLUES) - 1)
    i = min(int(pos), len(_BLUES) - 2)
    rgb = _BLUES[i] + (pos - i) * (_BLUES[i + 1] - _BLUES[i])
    return tuple(int(round(c)) for c in rgb)


def _luminance(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


@dataclass
class HeatmapLayout:
    """Pixel geometry of a heatmap picture; drawing and tests both read it."""

    width: int
    height: int
    cell: int
    grid_left: int
    grid_top: int
    rows: int
    cols: int
    row_label_boxes: list[Box]
    col_label_boxes: list[Box]
    colorbar: Box

    def cell_box(self, row: int, col: int) -> Box:
        left, top = self.grid_left + col * self.cell, self.grid_top + row * self.cell
        return (left, top, left + self.cell, top + self.cell)


def heatmap_layout(row_labels: Sequence[str], col_labels: Sequence[str], title: str,
                   tick_labels: Sequence[str], cell_text: str = "0.000") -> HeatmapLayout:
    rows, cols = len(row_labels), len(col_labels)
    cell = max(48, text_width(cell_text, CELL_TEXT_PX) + 12)
    row_label_w = max(text_width(s, TEXT_PX) for s in row_labels)
    col_label_h = max(text_width(s, TEXT_PX) + 2 for s in col_labels)
    grid_left = MARGIN + line_height(AXIS_TITLE_PX) + 12 + row_label_w + 10
    grid_top = MARGIN + line_height(TITLE_PX) + 16
    grid_right, grid_bottom = grid_left + cols * cell, grid_top + rows * cell
    bar_left = grid_right + 24
    bar = (bar_left, grid_top, bar_left + 22, grid_bottom)
    ticks_right = bar[2] + 6 + 8 + max(text_width(s, TEXT_PX) for s in tick_labels)
    width = max(ticks_right + MARGIN, text_width(title, TITLE_PX) + 2 * MARGIN)
    height = grid_bottom + 10 + col_label_h + 12 + line_height(AXIS_TITLE_PX) + MARGIN
    lh = line_height(TEXT_PX)
    row_boxes = [(grid_left - 10 - text_width(s, TEXT_PX), grid_top + r * cell + (cell - lh) // 2,
                  grid_left - 10, grid_top + r * cell + (cell + lh) // 2) for r, s in enumerate(row_labels)]
    col_boxes = [(grid_left + c * cell + (cell - lh) // 2, grid_bottom + 10,
                  grid_left + c * cell + (cell + lh) // 2, grid_bottom + 12 + text_width(s, TEXT_PX))
                 for c, s in enumerate(col_labels)]
    return HeatmapLayout(width, height, cell, grid_left, grid_top, rows, cols, row_boxes, col_boxes, bar)


def _draw_heatmap(values, row_labels, col_labels, title, x_title, y_title, vmin, vmax, decimals, path):
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"heatmap values have shape {values.shape} but there are {len(row_labels)} row and "
                         f"{len(col_labels)} column labels; pass one label per row and per column.")
    span = (vmax - vmin) or 1.0
    ticks = [t for t in nice_ticks(vmin, vmax) if vmin - 1e-9 <= t <= vmax + 1e-9]
    tick_text = [f"{t:.{_decimals(ticks)}f}" for t in ticks]
    layout = heatmap_layout(row_labels, col_labels, title, tick_text, "0." + "0" * decimals)
    canvas = Image.new("RGB", (layout.width, layout.height), WHITE)
    draw = ImageDraw.Draw(canvas)
    draw_text(draw, (layout.width // 2, MARGIN), title, TITLE_PX, anchor="mt")
    for r in range(layout.rows):
        for c in range(layout.cols):
            box = layout.cell_box(r, c)
            color = colormap((values[r, c] - vmin) / span)
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=color)
            # Exact zeros in grey so the non-zero (confused) cells stand out.
            ink = WHITE if _luminance(color) < 140 else (FAINT_GREY if values[r, c] == 0 else BLACK)
            draw_text(draw, ((box[0] + box[2]) // 2, (box[1] + box[3]) // 2), f"{values[r, c]:.{decimals}f}",
                       CELL_TEXT_PX, ink, anchor="mm")
    for label, box in zip(row_labels, layout.row_label_boxes):
        draw_text(draw, (box[2], (box[1] + box[3]) // 2), label, TEXT_PX, anchor="rm")
    for label, box in zip(col_labels, layout.col_label_boxes):
        _paste_vertical_text(canvas, label, TEXT_PX, (box[0] + box[2]) // 2, top=box[1])
    grid_bottom = layout.grid_top + layout.rows * layout.cell
    grid_center_x = layout.grid_left + layout.cols * layout.cell // 2
    x_title_top = max(b[3] for b in layout.col_label_boxes) + 12
    draw_text(draw, (grid_center_x, x_title_top), x_title, AXIS_TITLE_PX, anchor="mt")
    _paste_vertical_text(canvas, y_title, AXIS_TITLE_PX, MARGIN + line_height(AXIS_TITLE_PX) // 2,
                         center_y=(layout.grid_top + grid_bottom) // 2)
    left, top, right, bottom = layout.colorbar
    for y in range(top, bottom):  # top of the bar is vmax
        draw.line((left, y, right - 1, y), fill=colormap((bottom - 1 - y) / max(bottom - 1 - top, 1)))
    draw.rectangle((left, top, right - 1, bottom - 1), outline=AXIS_GREY)
    for t, text in zip(ticks, tick_text):
        y = round(bottom - 1 - (t - vmin) / span * (bottom - 1 - top))
        draw.line((right, y, right + 5, y), fill=AXIS_GREY)
        draw_text(draw, (right + 8, y), text, TEXT_PX, anchor="lm")
    return save_png(canvas, path), layout


def plot_confusion(matrix_normalized, class_names: Sequence[str], title: str, path):
    """Row-normalized confusion heatmap on a fixed 0..1 scale (comparable across models).

    Returns (image, HeatmapLayout); the PNG is written to `path`."""
    names = [display_name(n) for n in class_names]
    return _draw_heatmap(matrix_normalized, names, names, title, "Predicted", "True", 0.0, 1.0, 2, path)


def plot_prompt_heatmap(scores, class_names: Sequence[str], template_labels: Sequence[str], path, title: str):
    """Per-class score of each prompt template; the colour scale spans the data's own min..max.

    Returns (image, HeatmapLayout); the PNG is written to `path`."""
    scores = np.asarray(scores, dtype=np.float64)
    names = [display_name(n) for n in class_names]
    lo, hi = float(scores.min()), float(scores.max())
    return _draw_heatmap(scores, names, list(template_labels), title, "Prompt template", "Class", lo, hi, 3, path)


# ---------------------------------------------------------------------------- charts


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


def _decimals(ticks: Sequence[float]) -> int:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    digits = 0
    while digits < 6 and abs(round(step, digits) - step) > 1e-9 * max(abs(step), 1):
        digits += 1
    return digits


def model_colors(names: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """CLIP is always blue and SigLIP orange; any further series gets the next spare colour."""
    colors, spare = {}, iter(EXTRA_COLORS * 4)
    for name in names:
        family = SIGLIP_COLOR if "siglip" in name.lower() else CLIP_COLOR if "clip" in name.lower() else None
        colors[name] = family if family is not None and family not in colors.values() else next(spare)
    return colors


@dataclass
class _Chart:
    """A canvas with one plot area; maps data coordinates to pixels."""

    canvas: Image.Image
    area: Box
    x_range: tuple[float, float]
    y_range: tuple[float, float]

    def px(self, x: float, y: float) -> tuple[float, float]:
        left, top, right, bottom = self.area
        fx = (x - self.x_range[0]) / (self.x_range[1] - self.x_range[0])
        fy = (y - self.y_range[0]) / (self.y_range[1] - self.y_range[0])
        return left + fx * (right - left), bottom - fy * (bottom - top)


def _new_chart(title, legend, x_ticks, y_ticks, x_labels, y_labels, x_title, y_title, x_range, y_range,
               plot_size=(640, 400)) -> _Chart:
    """White canvas with title, legend row, gridlines, ticks, tick labels and axis titles."""
    legend_h = line_height(TEXT_PX) + 12 if legend else 0
    left = MARGIN + line_height(AXIS_TITLE_PX) + 12 + max(text_width(s, TEXT_PX) for s in y_labels) + 8
    top = MARGIN + line_height(TITLE_PX) + 10 + legend_h + 12
    area = (left, top, left + plot_size[0], top + plot_size[1])
    x_label_w = max(text_width(s, TEXT_PX) for s in x_labels)
    legend_w = _legend_width(legend)
    width = max(area[2] + x_label_w // 2 + MARGIN, text_width(title, TITLE_PX) + 2 * MARGIN, legend_w + 2 * MARGIN)
    height = area[3] + 8 + line_height(TEXT_PX) + 10 + line_height(AXIS_TITLE_PX) + MARGIN
    canvas = Image.new("RGB", (width, height), WHITE)
    chart = _Chart(canvas, area, x_range, y_range)
    draw = ImageDraw.Draw(canvas)
    draw_text(draw, ((area[0] + area[2]) // 2, MARGIN), title, TITLE_PX, anchor="mt")
    for value, label in zip(y_ticks, y_labels):
        y = round(chart.px(x_range[0], value)[1])
        draw.line((area[0], y, area[2], y), fill=GRID_GREY)
        draw.line((area[0] - 5, y, area[0], y), fill=AXIS_GREY)
        draw_text(draw, (area[0] - 8, y), label, TEXT_PX, anchor="rm")
    for value, label in zip(x_ticks, x_labels):
        x = round(chart.px(value, y_range[0])[0])
        draw.line((x, area[3], x, area[3] + 5), fill=AXIS_GREY)
        draw_text(draw, (x, area[3] + 8), label, TEXT_PX, anchor="mt")
    draw.rectangle((area[0], area[1], area[2], area[3]), outline=AXIS_GREY)
    draw_text(draw, ((area[0] + area[2]) // 2, height - MARGIN), x_title, AXIS_TITLE_PX, anchor="md")
    _paste_vertical_text(canvas, y_title, AXIS_TITLE_PX, MARGIN + line_height(AXIS_TITLE_PX) // 2,
                         center_y=(area[1] + area[3]) // 2)
    legend_center = min(max((area[0] + area[2]) // 2, MARGIN + legend_w // 2), width - MARGIN - legend_w // 2 - 1)
    _draw_legend(draw, legend, center_x=legend_center, top=MARGIN + line_height(TITLE_PX) + 10)
    return chart


_SWATCH_PX, _LEGEND_GAP_PX = 30, 24


def _legend_width(entries: Sequence[tuple[str, tuple, str]]) -> int:
    widths = [_SWATCH_PX + 8 + text_width(label, TEXT_PX) for label, _, _ in entries]
    return sum(widths) + _LEGEND_GAP_PX * max(len(entries) - 1, 0)


def _draw_legend(draw, entries: Sequence[tuple[str, tuple, str]], center_x: int, top: int) -> None:
    """One row of (label, colour, style) entries, style 'line' or 'dashed'."""
    swatch, gap = _SWATCH_PX, _LEGEND_GAP_PX
    widths = [swatch + 8 + text_width(label, TEXT_PX) for label, _, _ in entries]
    x = center_x - _legend_width(entries) // 2
    y = top + line_height(TEXT_PX) // 2
    for (label, color, style), w in zip(entries, widths):
        if style == "dashed":
            _dashed_line(draw, (x, y), (x + swatch, y), color)
        else:
            draw.line((x, y, x + swatch, y), fill=color, width=3)
            draw.ellipse((x + swatch // 2 - 4, y - 4, x + swatch // 2 + 4, y + 4), fill=color)
        draw_text(draw, (x + swatch + 8, y), label, TEXT_PX, anchor="lm")
        x += w + gap


def _dashed_line(draw, start, end, color, dash: int = 8, width: int = 2) -> None:
    length = math.dist(start, end)
    for s in np.arange(0, length, 2 * dash):
        a, b = s / length, min(s + dash, length) / length
        draw.line([(start[0] + f * (end[0] - start[0]), start[1] + f * (end[1] - start[1])) for f in (a, b)],
                  fill=color, width=width)


def _polyline(draw, points, color) -> None:
    if len(points) > 1:
        draw.line(points, fill=color, width=3, joint="curve")
    for x, y in points:
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=color)


def plot_loss_curves(curves: dict[str, Sequence[float]], path, title: str = "Training loss per epoch",
                     ylabel: str = "Training loss") -> Image.Image:
    """One line per model (epoch 1..E on x), fixed model colours, legend under the title."""
    if not curves or not all(len(curve) for curve in curves.values()):
        raise ValueError("plot_loss_curves needs at least one model with at least one epoch of losses.")
    colors = model_colors(list(curves))
    values = [v for curve in curves.values() for v in curve]
    epochs = max(len(curve) for curve in curves.values())
    y_ticks = nice_ticks(min(values), max(values))
    x_ticks = list(range(1, epochs + 1, math.ceil(epochs / 12)))  # whole epochs, all inside the axis
    digits = _decimals(y_ticks)
    chart = _new_chart(title, [(name, colors[name], "line") for name in curves], x_ticks, y_ticks,
                       [f"{t:g}" for t in x_ticks], [f"{t:.{digits}f}" for t in y_ticks], "Epoch", ylabel,
                       (0.6, epochs + 0.4), (y_ticks[0], y_ticks[-1]))
    draw = ImageDraw.Draw(chart.canvas)
    for name, curve in curves.items():
        _polyline(draw, [chart.px(e + 1, v) for e, v in enumerate(curve)], colors[name])
    return save_png(chart.canvas, path)


def plot_epoch_times(times: dict[str, float], path, title: str = "Average time per epoch") -> Image.Image:
    """Bar per model with its value written on top (seconds)."""
    if not times or min(times.values()) < 0 or max(times.values()) <= 0:
        raise ValueError(f"plot_epoch_times needs positive seconds per model, got {times}.")
    colors = model_colors(list(times))
    y_ticks = nice_ticks(0.0, max(times.values()) * 1.12)
    digits = _decimals(y_ticks)
    names = list(times)
    plot_w = max(360, sum(text_width(n, TEXT_PX) + 60 for n in names))
    chart = _new_chart(title, [], list(range(len(names))), y_ticks, names,
                       [f"{t:.{digits}f}" for t in y_ticks], "Model", "Seconds per epoch",
                       (-0.5, len(names) - 0.5), (0.0, y_ticks[-1]), plot_size=(plot_w, 360))
    draw = ImageDraw.Draw(chart.canvas)
    bar_half = min(60, plot_w / len(names) * 0.3)
    for i, name in enumerate(names):
        x, y = chart.px(i, times[name])
        draw.rectangle((round(x - bar_half), round(y), round(x + bar_half), chart.area[3]), fill=colors[name])
        draw_text(draw, (round(x), round(y) - 6), f"{times[name]:.1f} s", TEXT_PX, anchor="md")
    return save_png(chart.canvas, path)


def plot_reliability(data_by_model: dict[str, dict], path, title: str = "Reliability diagram") -> Image.Image:
    """Accuracy vs confidence per non-empty bin (metrics.reliability_diagram_data), diagonal = calibrated."""
    colors = model_colors(list(data_by_model))
    ticks = [i / 5 for i in range(6)]
    labels = [f"{t:.1f}" for t in ticks]
    legend = [(f"{n} (ECE {d['ece']:.3f})", colors[n], "line") for n, d in data_by_model.items()]
    legend.append(("perfect calibration", FAINT_GREY, "dashed"))
    chart = _new_chart(title, legend, ticks, ticks, labels, labels, "Confidence", "Accuracy",
                       (0.0, 1.0), (0.0, 1.0), plot_size=(440, 440))
    draw = ImageDraw.Draw(chart.canvas)
    _dashed_line(draw, chart.px(0, 0), chart.px(1, 1), FAINT_GREY)
    for name, data in data_by_model.items():
        points = [chart.px(c, a) for c, a, n in zip(data["confidence"], data["accuracy"], data["count"]) if n > 0]
        _polyline(draw, points, colors[name])
    return save_png(chart.canvas, path)
