"""The embedding map: test images' unit embeddings projected to 2-D by PCA, coloured by class, with the
class text embeddings marked (Pillow only).

One projection per family, fitted on its zero-shot and fine-tuned image embeddings stacked, so the two
panels of a family are in one coordinate system and show how fine-tuning moved the classes. CLIP's and
SigLIP's embeddings live in unrelated spaces (and at real size have different widths, 512 and 768), so
a projection fitted across families would mix two unrelated bases; what the four panels share is the
scale: one range on both axes of every panel. All vectors have length 1, so a distance on the map is a
distance between unit vectors (at most 2) in the plane that keeps the most of the family's variance.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .drawing import (AXIS_GREY, BLACK, CELL_TEXT_PX, MARGIN, TEXT_PX, TITLE_PX, WHITE, display_name, draw_text,
                      line_height, nice_ticks, save_png, text_width, tick_decimals)
from .xy_charts import _new_chart

# matplotlib's "tab20": ten hues, each dark then light; 15 classes take the darks first
_TAB20 = [(31, 119, 180), (174, 199, 232), (255, 127, 14), (255, 187, 120), (44, 160, 44), (152, 223, 138),
          (214, 39, 40), (255, 152, 150), (148, 103, 189), (197, 176, 213), (140, 86, 75), (196, 156, 148),
          (227, 119, 194), (247, 182, 210), (127, 127, 127), (199, 199, 199), (188, 189, 34), (219, 219, 141),
          (23, 190, 207), (158, 218, 229)]
CLASS_COLOURS = _TAB20[0::2] + _TAB20[1::2]
PANEL_PX = 360
DOT_RADIUS = 2
TEXT_MARK_RADIUS = 7


def class_colour(k: int) -> tuple[int, int, int]:
    return CLASS_COLOURS[k % len(CLASS_COLOURS)]


def pca_2d(embeddings: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean [D], components [2, D], share of the variance each keeps [2]) of the rows of every set stacked.

    PCA by SVD of the centred data X - mean = U S V^T: the components are V's first two rows. An
    SVD's signs are arbitrary; each component is turned so that its largest-magnitude entry is positive,
    so the same embeddings always give the same picture."""
    x = np.concatenate([np.asarray(e, dtype=np.float64) for e in embeddings])
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    components = vt[:2] * np.sign(vt[:2][np.arange(2), np.abs(vt[:2]).argmax(1)])[:, None]
    return mean, components, (s[:2] ** 2) / (s ** 2).sum()


def project(x: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """[N, D] -> [N, 2] coordinates in the PCA plane."""
    return (np.asarray(x, dtype=np.float64) - mean) @ components.T


@dataclass
class Panel:
    """One model's test images and class texts in its family's PCA plane."""

    title: str
    images: np.ndarray  # [N, 2]
    labels: np.ndarray  # [N] class ids
    texts: np.ndarray  # [K, 2] the class text embeddings
    variance: np.ndarray  # [2] share of the family's variance on each axis


def shared_range(panels: list[Panel]) -> tuple[float, float]:
    """One range for both axes of every panel: every point fits, and a unit of x is a unit of y."""
    points = np.concatenate([np.concatenate([p.images, p.texts]) for p in panels])
    lo, hi = float(points.min()), float(points.max())
    pad = 0.05 * (hi - lo or 1.0)
    return lo - pad, hi + pad


def _panel_image(panel: Panel, class_names: list[str], ticks: list[float], span: tuple[float, float],
                 seed: int) -> Image.Image:
    labels = [f"{t:.{tick_decimals(ticks)}f}" for t in ticks]
    chart = _new_chart(panel.title, [], ticks, ticks, labels, labels,
                       f"PC 1 ({panel.variance[0]:.0%} of the variance)", f"PC 2 ({panel.variance[1]:.0%})",
                       span, span, plot_size=(PANEL_PX, PANEL_PX))
    draw = ImageDraw.Draw(chart.canvas)
    for i in np.random.default_rng(seed).permutation(len(panel.images)):  # no class always drawn on top
        x, y = chart.px(*panel.images[i])
        draw.ellipse((x - DOT_RADIUS, y - DOT_RADIUS, x + DOT_RADIUS, y + DOT_RADIUS),
                     fill=class_colour(panel.labels[i]))
    r = TEXT_MARK_RADIUS
    middle = (chart.area[0] + chart.area[2]) / 2
    for k, point in enumerate(panel.texts):  # a diamond per class text, outlined, its name on the inner side
        x, y = chart.px(*point)
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=class_colour(k), outline=BLACK, width=2)
        left = x < middle
        draw_text(draw, (x + r + 3 if left else x - r - 3, y), display_name(class_names[k]), CELL_TEXT_PX, BLACK,
                  anchor="lm" if left else "rm")
    return chart.canvas


def _class_legend(class_names: list[str], width: int) -> Image.Image:
    """Colour swatches with class names, wrapped into rows `width` pixels wide; a diamond for the texts."""
    entries = [(display_name(c), class_colour(k), "dot") for k, c in enumerate(class_names)]
    entries.append(("class text embedding (its prompts' mean)", WHITE, "diamond"))
    lh, swatch, gap = line_height(TEXT_PX) + 6, 14, 18
    rows, x = [[]], 0
    for entry in entries:
        w = swatch + 6 + text_width(entry[0], TEXT_PX)
        if rows[-1] and x + w > width:
            rows.append([])
            x = 0
        rows[-1].append((x, entry))
        x += w + gap
    canvas = Image.new("RGB", (width, len(rows) * lh), WHITE)
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = r * lh + lh // 2
        for x, (label, colour, style) in row:
            if style == "dot":
                draw.ellipse((x + 2, y - 5, x + 12, y + 5), fill=colour)
            else:
                draw.polygon([(x + 7, y - 7), (x + 14, y), (x + 7, y + 7), (x, y)], fill=AXIS_GREY, outline=BLACK)
            draw_text(draw, (x + swatch + 6, y), label, TEXT_PX, anchor="lm")
    return canvas


def plot_embedding_map(rows: list[list[Panel]], class_names: list[str], path, title: str,
                       seed: int = 0) -> Image.Image:
    """Panels in rows (one row per family: zero-shot, fine-tuned), one range on every axis, the class legend
    below. `rows` may hold one or two panels each."""
    span = shared_range([p for row in rows for p in row])
    ticks = [t for t in nice_ticks(*span, max_ticks=6) if span[0] <= t <= span[1]]
    images = [[_panel_image(p, class_names, ticks, span, seed) for p in row] for row in rows]
    cell_w = max(im.width for row in images for im in row)
    cell_h = max(im.height for row in images for im in row)
    columns = max(len(row) for row in images)
    width = max(columns * cell_w, text_width(title, TITLE_PX)) + 2 * MARGIN
    legend = _class_legend(class_names, width - 2 * MARGIN)
    top = MARGIN + line_height(TITLE_PX) + 8
    canvas = Image.new("RGB", (width, top + len(rows) * cell_h + legend.height + MARGIN), WHITE)
    draw_text(ImageDraw.Draw(canvas), (width // 2, MARGIN), title, TITLE_PX, anchor="mt")
    for r, row in enumerate(images):
        for c, image in enumerate(row):
            canvas.paste(image, (MARGIN + c * cell_w, top + r * cell_h))
    canvas.paste(legend, (MARGIN, top + len(rows) * cell_h))
    return save_png(canvas, path)
