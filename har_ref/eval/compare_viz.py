"""compare_viz: test images captioned with the ground truth and each model's prediction (Pillow only).

A panel is the image above 'GT: <class>' in BLACK and one '<model>: <prediction>' line per model,
GREEN when right and RED when wrong; a grid stacks panels in rows by outcome (both right, both
wrong, only one model right). Text sizes, colours and margins come from plots.py.
"""
from __future__ import annotations

from PIL import Image, ImageDraw

from .plots import (AXIS_TITLE_PX, BLACK, FAINT_GREY, GREEN, GRID_GREY, MARGIN, RED, TEXT_PX, TITLE_PX, WHITE,
                    display_name, draw_text, line_height, save_png, text_width)

PANEL_IMAGE_PX = 256
PANEL_PAD = 8


def compare_panel(image: Image.Image, true_name: str, predictions: dict[str, str]) -> Image.Image:
    """The image scaled to fit 256 px, then 'GT: <class>' in BLACK and one '<model>: <pred>' line
    per model, GREEN when the prediction equals the ground truth and RED when it does not."""
    lines = [(f"GT: {display_name(true_name)}", BLACK)]
    lines += [(f"{model}: {display_name(pred)}", GREEN if pred == true_name else RED)
              for model, pred in predictions.items()]
    lh = line_height(TEXT_PX) + 4
    width = max(PANEL_IMAGE_PX, max(text_width(text, TEXT_PX) for text, _ in lines)) + 2 * PANEL_PAD
    height = PANEL_PAD + PANEL_IMAGE_PX + 8 + len(lines) * lh + PANEL_PAD
    panel = Image.new("RGB", (width, height), WHITE)
    image = image.convert("RGB")
    scale = PANEL_IMAGE_PX / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.Resampling.LANCZOS)
    panel.paste(image, ((width - image.width) // 2, PANEL_PAD + (PANEL_IMAGE_PX - image.height) // 2))
    draw = ImageDraw.Draw(panel)
    for i, (text, color) in enumerate(lines):
        draw_text(draw, (PANEL_PAD, PANEL_PAD + PANEL_IMAGE_PX + 8 + i * lh), text, TEXT_PX, color)
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
