"""compare_viz: test images captioned with the ground truth and each model's prediction (Pillow only).

A panel is the image above 'GT: <class>' in BLACK and one '<model>: <prediction>' line per model,
GREEN when right and RED when wrong; a grid stacks panels in rows by outcome (both right, both
wrong, only one model right). Text sizes, colours and margins come from drawing.py.

A map over an image (explain.py's maps, spread to the image by explain.py::pixel_mass) is drawn as
its density, mass per pixel in units of the uniform map's, on one colour scale for every map of a
picture, whatever its patch grid: `map_overlay` and its `map_legend`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .drawing import (AXIS_GREY, AXIS_TITLE_PX, BLACK, FAINT_GREY, GREEN, GRID_GREY, MARGIN, RED, TEXT_PX, TITLE_PX,
                      WHITE, display_name, draw_text, line_height, nice_ticks, save_png, text_width, tick_decimals)

PANEL_IMAGE_PX = 256
PANEL_PAD = 8
# matplotlib's "inferno" anchors: luminance rises monotonically, so brighter always means more mass.
_INFERNO = np.array(
    [(0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85), (227, 89, 51), (249, 140, 10),
     (249, 201, 50), (252, 255, 164)], dtype=np.float64,
)
# 256 steps along the anchors: a table lookup per pixel (an 8-bit picture has no finer steps)
_HEAT_TABLE = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_INFERNO)), _INFERNO[:, c])
                        for c in range(3)], axis=1).round().astype(np.uint8)
MAP_OPACITY = 0.6  # the rest is the image in grey, so the map's colours are never the photo's
LEGEND_BAR_PX = 14


def fitted(image: Image.Image, px: int = PANEL_IMAGE_PX) -> Image.Image:
    """The image in RGB, scaled (up or down) so that its longer side is px."""
    image = image.convert("RGB")
    scale = px / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.LANCZOS)


def density(mass: np.ndarray) -> np.ndarray:
    """Mass per pixel in units of the uniform map's (1 = the mass spread evenly over the image)."""
    return mass * mass.size


def heat_colours(t: np.ndarray) -> np.ndarray:
    """inferno colours [..., 3] uint8 for t in [0, 1] (clipped), linear between the anchors."""
    return _HEAT_TABLE[np.rint(np.clip(t, 0, 1) * 255).astype(np.intp)]


def map_overlay(image: Image.Image, mass: np.ndarray, vmax: float) -> Image.Image:
    """The map's density (0..vmax on the inferno scale) over the image in grey; mass is [height, width]
    of the image as drawn (explain.py::pixel_mass with out_size=image.size)."""
    if mass.shape != (image.height, image.width):
        raise ValueError(f"a map of {mass.shape[1]}x{mass.shape[0]} pixels cannot be drawn over an image of "
                         f"{image.width}x{image.height}; spread it to the drawn size (pixel_mass out_size).")
    grey = np.asarray(image.convert("L"), dtype=np.float64)[..., None]
    heat = heat_colours(density(mass) / vmax)
    return Image.fromarray(np.rint((1 - MAP_OPACITY) * grey + MAP_OPACITY * heat).astype(np.uint8), mode="RGB")


def legend_top(vmaxes: list[float]) -> float:
    """The colour scale's top for maps with these largest densities: the largest, rounded up to a tick."""
    top = max(vmaxes)
    return next(t for t in nice_ticks(0, top, max_ticks=6) if t >= top - 1e-9)


def map_legend(vmax: float, width: int) -> Image.Image:
    """The colour bar from 0 to vmax, its ticks, and what the unit is, `width` pixels wide."""
    ticks = [t for t in nice_ticks(0, vmax, max_ticks=6) if t <= vmax + 1e-9]
    labels = [f"{t:.{tick_decimals(ticks)}f}" for t in ticks]
    title = "map density: mass per pixel, in units of the uniform map's (1 = spread evenly over the image)"
    lh = line_height(TEXT_PX)
    pad = text_width(labels[-1], TEXT_PX) // 2 + 2
    bar_w = max(width - 2 * pad, 40)
    canvas = Image.new("RGB", (max(width, text_width(title, TEXT_PX)), lh + 4 + LEGEND_BAR_PX + 6 + lh), WHITE)
    draw = ImageDraw.Draw(canvas)
    draw_text(draw, (0, 0), title, TEXT_PX)
    top = lh + 4
    row = heat_colours(np.linspace(0, 1, bar_w))
    canvas.paste(Image.fromarray(np.repeat(row[None], LEGEND_BAR_PX, axis=0), mode="RGB"), (pad, top))
    draw.rectangle((pad, top, pad + bar_w - 1, top + LEGEND_BAR_PX - 1), outline=AXIS_GREY)
    for t, label in zip(ticks, labels):
        x = pad + round(t / vmax * (bar_w - 1))
        draw.line((x, top + LEGEND_BAR_PX, x, top + LEGEND_BAR_PX + 4), fill=AXIS_GREY)
        draw_text(draw, (x, top + LEGEND_BAR_PX + 6), label, TEXT_PX, anchor="mt")
    return canvas


def compare_panel(image: Image.Image, true_name: str, predictions: dict[str, str],
                  maps: dict[str, np.ndarray] | None = None) -> Image.Image:
    """The image scaled to fit 256 px, then 'GT: <class>' in BLACK and one '<model>: <pred>' line
    per model, GREEN when the prediction equals the ground truth and RED when it does not.

    maps, {caption: mass per pixel of the image as `fitted` draws it}, are drawn right of the image,
    each above its caption, on one colour scale (its legend at the bottom)."""
    maps = maps or {}
    image = fitted(image)
    vmax = legend_top([float(density(mass).max()) for mass in maps.values()]) if maps else 1.0
    cells = [(image, "")] + [(map_overlay(image, mass, vmax), caption) for caption, mass in maps.items()]
    lines = [(f"GT: {display_name(true_name)}", BLACK)]
    lines += [(f"{model}: {display_name(pred)}", GREEN if pred == true_name else RED)
              for model, pred in predictions.items()]
    lh = line_height(TEXT_PX) + 4
    cell = PANEL_IMAGE_PX + PANEL_PAD
    text_top = PANEL_PAD + PANEL_IMAGE_PX + 8 + (lh if maps else 0)
    width = max(len(cells) * cell - PANEL_PAD, *(text_width(text, TEXT_PX) for text, _ in lines),
                *(i * cell + text_width(caption, TEXT_PX) for i, (_, caption) in enumerate(cells))) + 2 * PANEL_PAD
    legend = map_legend(vmax, width - 2 * PANEL_PAD) if maps else None
    height = text_top + len(lines) * lh + PANEL_PAD + (legend.height + 8 if legend else 0)
    panel = Image.new("RGB", (max(width, legend.width + 2 * PANEL_PAD) if legend else width, height), WHITE)
    draw = ImageDraw.Draw(panel)
    for i, (picture, caption) in enumerate(cells):
        left = PANEL_PAD + i * cell + (PANEL_IMAGE_PX - picture.width) // 2 if maps else (width - picture.width) // 2
        panel.paste(picture, (left, PANEL_PAD + (PANEL_IMAGE_PX - picture.height) // 2))
        draw_text(draw, (PANEL_PAD + i * cell, PANEL_PAD + PANEL_IMAGE_PX + 4), caption, TEXT_PX)
    for i, (text, color) in enumerate(lines):
        draw_text(draw, (PANEL_PAD, text_top + i * lh), text, TEXT_PX, color)
    if legend:
        panel.paste(legend, (PANEL_PAD, text_top + len(lines) * lh + 8))
    return panel


def compare_grid(panels_by_category: dict[str, list[Image.Image]], path, title: str) -> Image.Image:
    """One row per category ('both right', 'only CLIP right', ...), its title above its panels."""
    panels = [p for row in panels_by_category.values() for p in row]
    cell_w = max((p.width for p in panels), default=PANEL_IMAGE_PX)
    cell_h = max((p.height for p in panels), default=0)
    columns = max((len(row) for row in panels_by_category.values()), default=0)
    gap, row_title_h = 12, line_height(AXIS_TITLE_PX) + 8
    content_w = max(columns * cell_w + max(columns - 1, 0) * gap,
                    max((text_width(t, AXIS_TITLE_PX) for t in panels_by_category), default=0))
    width = max(content_w, text_width(title, TITLE_PX)) + 2 * MARGIN
    row_heights = [row_title_h + (cell_h if row else line_height(TEXT_PX)) + gap for row in panels_by_category.values()]
    top = MARGIN + line_height(TITLE_PX) + 12
    canvas = Image.new("RGB", (width, top + sum(row_heights) + MARGIN), WHITE)
    draw = ImageDraw.Draw(canvas)
    draw_text(draw, (width // 2, MARGIN), title, TITLE_PX, anchor="mt")
    y = top
    for (category, row), row_h in zip(panels_by_category.items(), row_heights):
        draw.line((MARGIN, y, width - MARGIN, y), fill=GRID_GREY)
        draw_text(draw, (MARGIN, y + 4), category, AXIS_TITLE_PX)
        if not row:
            draw_text(draw, (MARGIN, y + row_title_h), "(no images)", TEXT_PX, FAINT_GREY)
        for i, panel in enumerate(row):
            canvas.paste(panel, (MARGIN + i * (cell_w + gap), y + row_title_h))
        y += row_h
    return save_png(canvas, path)
