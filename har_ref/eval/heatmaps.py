"""Heatmaps drawn with Pillow alone: the confusion matrix, the prompt-ablation table (per-class score
of each template), a grid of scores and a table of signed differences (a study's towers x loss grid and
per-class differences). Each cell shows its value; a colour bar gives the scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .drawing import (AXIS_GREY, AXIS_TITLE_PX, BLACK, CELL_TEXT_PX, FAINT_GREY, MARGIN, TEXT_PX, TITLE_PX, WHITE, Box,
                      display_name, draw_text, line_height, nice_ticks, paste_vertical_text, save_png, text_width,
                      tick_decimals)

# matplotlib's "Blues" anchors: luminance falls monotonically, so darker always means larger.
_BLUES = np.array(
    [(247, 251, 255), (222, 235, 247), (198, 219, 239), (158, 202, 225), (107, 174, 214),
     (66, 146, 198), (33, 113, 181), (8, 81, 156), (8, 48, 107)], dtype=np.float64,
)


def _between_anchors(anchors: np.ndarray, t: float) -> tuple[int, int, int]:
    """The colour at t in [0, 1] (clamped) of evenly spaced RGB anchors, linear between neighbours."""
    pos = min(max(float(t), 0.0), 1.0) * (len(anchors) - 1)
    i = min(int(pos), len(anchors) - 2)
    rgb = anchors[i] + (pos - i) * (anchors[i + 1] - anchors[i])
    return tuple(int(round(c)) for c in rgb)


def colormap(t: float) -> tuple[int, int, int]:
    """Blues colour for t in [0, 1]."""
    return _between_anchors(_BLUES, t)


# matplotlib's "RdBu" anchors: red below the middle, white at it, blue above (blue is better, as in Blues).
_RED_BLUE = np.array(
    [(103, 0, 31), (178, 24, 43), (214, 96, 77), (244, 165, 130), (253, 219, 199), (247, 247, 247),
     (209, 229, 240), (146, 197, 222), (67, 147, 195), (33, 102, 172), (5, 48, 97)], dtype=np.float64,
)


def diverging_colormap(t: float) -> tuple[int, int, int]:
    """Red-white-blue colour for t in [0, 1], white at 0.5."""
    return _between_anchors(_RED_BLUE, t)


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


def _draw_heatmap(values, row_labels, col_labels, title, x_title, y_title, vmin, vmax, decimals, path,
                  cmap=colormap):
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"heatmap values have shape {values.shape} but there are {len(row_labels)} row and "
                         f"{len(col_labels)} column labels; pass one label per row and per column.")
    span = (vmax - vmin) or 1.0
    ticks = [t for t in nice_ticks(vmin, vmax) if vmin - 1e-9 <= t <= vmax + 1e-9]
    tick_text = [f"{t:.{tick_decimals(ticks)}f}" for t in ticks]
    layout = heatmap_layout(row_labels, col_labels, title, tick_text, "0." + "0" * decimals)
    canvas = Image.new("RGB", (layout.width, layout.height), WHITE)
    draw = ImageDraw.Draw(canvas)
    draw_text(draw, (layout.width // 2, MARGIN), title, TITLE_PX, anchor="mt")
    for r in range(layout.rows):
        for c in range(layout.cols):
            box = layout.cell_box(r, c)
            color = cmap((values[r, c] - vmin) / span)
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=color)
            # Exact zeros in grey so the non-zero (confused) cells stand out.
            ink = WHITE if _luminance(color) < 140 else (FAINT_GREY if values[r, c] == 0 else BLACK)
            draw_text(draw, ((box[0] + box[2]) // 2, (box[1] + box[3]) // 2), f"{values[r, c]:.{decimals}f}",
                       CELL_TEXT_PX, ink, anchor="mm")
    for label, box in zip(row_labels, layout.row_label_boxes):
        draw_text(draw, (box[2], (box[1] + box[3]) // 2), label, TEXT_PX, anchor="rm")
    for label, box in zip(col_labels, layout.col_label_boxes):
        paste_vertical_text(canvas, label, TEXT_PX, (box[0] + box[2]) // 2, top=box[1])
    grid_bottom = layout.grid_top + layout.rows * layout.cell
    grid_center_x = layout.grid_left + layout.cols * layout.cell // 2
    x_title_top = max(b[3] for b in layout.col_label_boxes) + 12
    draw_text(draw, (grid_center_x, x_title_top), x_title, AXIS_TITLE_PX, anchor="mt")
    paste_vertical_text(canvas, y_title, AXIS_TITLE_PX, MARGIN + line_height(AXIS_TITLE_PX) // 2,
                         center_y=(layout.grid_top + grid_bottom) // 2)
    left, top, right, bottom = layout.colorbar
    for y in range(top, bottom):  # top of the bar is vmax
        draw.line((left, y, right - 1, y), fill=cmap((bottom - 1 - y) / max(bottom - 1 - top, 1)))
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


def plot_score_grid(values, row_labels: Sequence[str], col_labels: Sequence[str], title: str, x_title: str,
                    y_title: str, path):
    """A small table of scores (e.g. macro-F1 per towers x loss); the colour scale spans the data's min..max.

    Returns (image, HeatmapLayout); the PNG is written to `path`."""
    values = np.asarray(values, dtype=np.float64)
    return _draw_heatmap(values, list(row_labels), list(col_labels), title, x_title, y_title,
                         float(values.min()), float(values.max()), 3, path)


def plot_difference_heatmap(values, row_labels: Sequence[str], col_labels: Sequence[str], title: str,
                            x_title: str, y_title: str, path):
    """Signed differences (e.g. per-class F1, cell - baseline) on a red-white-blue scale symmetric about 0:
    white is no change, blue a gain, red a loss. Class names as labels read as display names.

    Returns (image, HeatmapLayout); the PNG is written to `path`."""
    values = np.asarray(values, dtype=np.float64)
    largest = float(np.abs(values).max()) or 1e-3
    return _draw_heatmap(values, list(row_labels), [display_name(c) for c in col_labels], title, x_title, y_title,
                         -largest, largest, 3, path, cmap=diverging_colormap)
