"""`python -m har_ref explain`: one PNG per image with each model's maps over it (Pillow only).

For every image: the image, then one row per checkpoint with its name, its weights, its top-3 classes
with the model's own probabilities (softmax for CLIP, sigmoid for SigLIP: predict.py's rule and code)
and its maps (explain.py): the attention map (CLIP rollout, SigLIP probe attention) and one
class-specific map per --class. The top-3 are scored from the embedding of the maps' own forward
(explain.py::trace_image_tower), the model's up to float rounding (tests/test_explain.py), so each
image goes through each tower once. Every map is drawn as mass per pixel of the image on one colour
scale (compare_viz.py::map_overlay), so a 7x7 and a 14x14 grid read alike. Checkpoints, label
spaces, image decoding and skipped files are predict's (predict.py::Predictor, decode_batch).

The report's confused-pair pictures (report_maps.py::draw_pairs) are drawn here too, by pair_picture:
images with their predictions, rows of maps under column titles, one colour scale per kind of map.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..model.config import ModelConfig
from ..model.transforms import load_image
from .compare_viz import PANEL_IMAGE_PX, density, fitted, legend_top, map_legend, map_overlay
from .drawing import (BLACK, FAINT_GREY, GREEN, GRID_GREY, MARGIN, RED, TEXT_PX, TITLE_PX, WHITE, display_name,
                      draw_text, line_height, save_png, text_width)
from .explain import ATTENTION_MAP_NAMES, class_maps, pixel_mass, trace_image_tower, traced_attention_map
from .predict import Predictor, collect_images, decode_batch, fmt, probabilities

GAP = 12


@dataclass
class ModelRow:
    """One checkpoint's part of an image's picture."""

    name: str
    weights: Path
    kind: str  # "softmax" | "sigmoid"
    cfg: ModelConfig
    top: list[tuple[str, float]]
    maps: list[tuple[str, torch.Tensor]]  # (caption, [grid_h, grid_w] map)


def explain_picture(image: Image.Image, title: str, rows: list[ModelRow]) -> Image.Image:
    """The image, then per model its header lines and its maps over the image, and the colour legend."""
    shown = fitted(image)
    masses = [[pixel_mass(m, image.size, row.cfg, shown.size) for _, m in row.maps] for row in rows]
    vmax = legend_top([float(density(mass).max()) for row in masses for mass in row])
    lh = line_height(TEXT_PX) + 4
    cell = PANEL_IMAGE_PX + GAP
    headers = [[f"{row.name}  (weights: {row.weights})",
                f"top-3, {row.kind}: " + ", ".join(f"{display_name(c)} {fmt(p)}" for c, p in row.top)]
               for row in rows]
    row_h = 2 * lh + 4 + shown.height + 4 + lh + GAP
    maps_left = MARGIN + cell
    cells_right = [maps_left + i * cell + max(PANEL_IMAGE_PX, text_width(caption, TEXT_PX))
                   for row in rows for i, (caption, _) in enumerate(row.maps)]
    width = max(*cells_right, maps_left + max(text_width(t, TEXT_PX) for h in headers for t in h),
                MARGIN + text_width(title, TITLE_PX)) + MARGIN
    legend = map_legend(vmax, width - 2 * MARGIN)
    top = MARGIN + line_height(TITLE_PX) + GAP
    height = top + len(rows) * row_h + legend.height + MARGIN
    canvas = Image.new("RGB", (max(width, legend.width + 2 * MARGIN), height), WHITE)
    draw = ImageDraw.Draw(canvas)
    draw_text(draw, (MARGIN, MARGIN), title, TITLE_PX)
    canvas.paste(shown, (MARGIN + (PANEL_IMAGE_PX - shown.width) // 2, top + 2 * lh + 4))
    draw_text(draw, (MARGIN, top + 2 * lh + 8 + shown.height), f"{image.width}x{image.height} px", TEXT_PX,
              FAINT_GREY)
    for r, (row, header, row_masses) in enumerate(zip(rows, headers, masses)):
        y = top + r * row_h
        draw_text(draw, (maps_left, y), header[0], TEXT_PX)
        draw_text(draw, (maps_left, y + lh), header[1], TEXT_PX)
        for i, ((caption, _), mass) in enumerate(zip(row.maps, row_masses)):
            x = maps_left + i * cell
            canvas.paste(map_overlay(shown, mass, vmax), (x + (PANEL_IMAGE_PX - shown.width) // 2, y + 2 * lh + 4))
            draw_text(draw, (x, y + 2 * lh + 8 + shown.height), caption, TEXT_PX)
    canvas.paste(legend, (MARGIN, top + len(rows) * row_h))
    return canvas


def picture_names(paths: list[Path]) -> dict[Path, str]:
    """A PNG name per image, unique: its path below the images' common folder, '/' as '--'
    ("texting--0003.png"); two images that differ only in their extension keep it ("a.jpg.png")."""
    common = Path(os.path.commonpath([p.resolve().parent for p in paths]))
    stems = ["--".join(p.resolve().relative_to(common).with_suffix("").parts) for p in paths]
    repeated = {s for s in stems if stems.count(s) > 1}
    return {p: (f"{s}{p.suffix}" if s in repeated else s) + ".png" for p, s in zip(paths, stems)}


def run_explain(weights: list[str], images: list[str], out: str | Path, explain_classes: list[str] | None = None,
                class_names: list[str] | None = None, prompts: str | None = None,
                batch_size: int = 32) -> list[Path]:
    """Write OUT/<name>.png per decodable image (see picture_names); returns the paths written.

    Raises ValueError/FileNotFoundError (one sentence each) on bad arguments, and ValueError when no
    image could be decoded.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}.")
    paths = collect_images(images)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    predictors = [Predictor(w, class_names, prompts, device) for w in weights]
    for p in predictors:
        for c in explain_classes or []:
            if c not in p.class_names:
                raise ValueError(f"--class {c!r} is not one of {p.weights}'s classes: {', '.join(p.class_names)}.")
    bad: dict[Path, str] = {}
    rows: dict[Path, list[ModelRow]] = {}
    names_taken: list[str] = []
    for p in predictors:  # one checkpoint in memory at a time; its rows are small
        p.load()
        name = p.name
        name = f"{name} ({p.weights.name})" if name in names_taken else name
        names_taken.append(name)
        wanted = [p.class_names.index(c) for c in explain_classes or []]
        for start in range(0, len(paths), batch_size):
            batch = decode_batch(paths[start:start + batch_size], bad)
            if not batch:
                continue
            pixels = p.pixels([image for _, image in batch])
            with torch.no_grad():  # one forward gives the maps and the embedding the top-3 are scored from
                trace = trace_image_tower(p.model.vision, pixels)
            probs = probabilities(p.scores(trace.embedding), p.loss)
            maps = [(ATTENTION_MAP_NAMES[p.family], traced_attention_map(trace))]
            if wanted:
                maps += [(f"why {display_name(p.class_names[c])} (grad x attention)", m)
                         for c, m in zip(wanted, class_maps(p.model, pixels, p.class_emb, wanted))]
            for b, ((path, _), row) in enumerate(zip(batch, probs)):
                top = row.topk(min(3, len(p.class_names)))
                rows.setdefault(path, []).append(ModelRow(
                    name, p.weights, p.kind, p.model.cfg,
                    [(p.class_names[i], v) for v, i in zip(top.values.tolist(), top.indices.tolist())],
                    [(caption, m[b].cpu()) for caption, m in maps]))
        p.unload()
    if not rows:
        raise ValueError(f"none of the {len(paths)} image(s) could be decoded (each is named above); "
                         "pass readable JPEG/PNG/BMP/WebP files.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path, name in picture_names(list(rows)).items():
        written.append(out / name)
        # zlib's fastest level: one picture per image, and pictures of photos barely compress further
        explain_picture(load_image(path), str(path), rows[path]).save(written[-1], format="PNG", compress_level=1)
        print(f"wrote {written[-1]}", flush=True)
    return written


# ---------------------------------------------------------------------------- the report's pair pictures

PAIR_CELL_PX = 160  # each image and map in the report's pair pictures (report_maps.py::draw_pairs)
PAIR_GAP = 10


def pair_picture(title: list[str], columns: list[tuple[str, str, int]], scales: list[str], blocks: list[dict],
                 path) -> Image.Image:
    """Per image a block: the image with its true class and each run's prediction (GREEN right, RED wrong),
    then per run a row of maps under the column titles (None: an empty cell).

    title: a line in TITLE_PX, then lines in TEXT_PX. columns: (stage, map, scale) with `scale` an index into
    `scales`, the captions of the colour scales: the columns of one scale share it (attention maps before and
    after fine-tuning on one, the class maps on another, so the sharper class maps do not darken the rest).
    blocks: [{"image", "caption", "true", "predictions": {run: class}, "rows": [(label, [map])]}], each map the
    mass per pixel of the image as `fitted(image, PAIR_CELL_PX)` draws it."""
    vmax = [legend_top([float(density(row[c]).max()) for b in blocks for _, row in b["rows"]
                        for c, column in enumerate(columns) if column[2] == k and row[c] is not None] or [1.0])
            for k in range(len(scales))]
    lh = line_height(TEXT_PX) + 4
    cell = PAIR_CELL_PX + PAIR_GAP
    left_w = max(PAIR_CELL_PX, *(text_width(t, TEXT_PX) for b in blocks for t in
                            [b["caption"], f"GT: {display_name(b['true'])}"]
                            + [f"{r}: {display_name(p)}" for r, p in b["predictions"].items()])) + 2 * PAIR_GAP
    maps_w = max(len(columns) * cell, *(text_width(label, TEXT_PX) for b in blocks for label, _ in b["rows"]),
                 *(c * cell + text_width(t, TEXT_PX) for c, column in enumerate(columns) for t in column[:2]))
    row_h = lh + PAIR_CELL_PX + PAIR_GAP
    block_h = [max(len(b["rows"]) * row_h, PAIR_CELL_PX + (2 + len(b["predictions"])) * lh) + 2 * PAIR_GAP for b in blocks]
    width = max(MARGIN + left_w + maps_w + MARGIN, text_width(title[0], TITLE_PX) + 2 * MARGIN,
                *(text_width(t, TEXT_PX) + 2 * MARGIN for t in title[1:]))
    legends = [map_legend(v, width - 2 * MARGIN) for v in vmax]
    header_top = MARGIN + line_height(TITLE_PX) + (len(title) - 1) * lh + 12
    top = header_top + 2 * lh + 4
    legends_h = sum(lh + legend.height + 8 for legend in legends)
    canvas = Image.new("RGB", (max(width, *(legend.width + 2 * MARGIN for legend in legends)),
                               top + sum(block_h) + legends_h + MARGIN), WHITE)
    draw = ImageDraw.Draw(canvas)
    draw_text(draw, (MARGIN, MARGIN), title[0], TITLE_PX)
    for k, line in enumerate(title[1:]):
        draw_text(draw, (MARGIN, MARGIN + line_height(TITLE_PX) + 4 + k * lh), line, TEXT_PX)
    maps_left = MARGIN + left_w
    for c, (stage, kind, _) in enumerate(columns):
        draw_text(draw, (maps_left + c * cell, header_top), stage, TEXT_PX)
        draw_text(draw, (maps_left + c * cell, header_top + lh), kind, TEXT_PX)
    y = top
    for b, h in zip(blocks, block_h):
        draw.line((MARGIN, y, canvas.width - MARGIN, y), fill=GRID_GREY)
        shown = fitted(b["image"], PAIR_CELL_PX)
        canvas.paste(shown, (MARGIN, y + PAIR_GAP))
        lines = [(f"GT: {display_name(b['true'])}", BLACK)]
        lines += [(f"{run}: {display_name(p)}", GREEN if p == b["true"] else RED)
                  for run, p in b["predictions"].items()]
        lines += [(b["caption"], FAINT_GREY)]
        for k, (text, colour) in enumerate(lines):
            draw_text(draw, (MARGIN, y + PAIR_GAP + PAIR_CELL_PX + 4 + k * lh), text, TEXT_PX, colour)
        for r, (label, row) in enumerate(b["rows"]):
            row_top = y + PAIR_GAP + r * row_h
            draw_text(draw, (maps_left, row_top), label, TEXT_PX)
            for c, mass in enumerate(row):
                x = maps_left + c * cell
                if mass is None:
                    draw_text(draw, (x, row_top + lh + PAIR_CELL_PX // 2), "(no weights given)", TEXT_PX, FAINT_GREY)
                else:
                    canvas.paste(map_overlay(shown, mass, vmax[columns[c][2]]), (x, row_top + lh))
        y += h
    for caption, legend in zip(scales, legends):
        draw.line((MARGIN, y, canvas.width - MARGIN, y), fill=GRID_GREY)
        draw_text(draw, (MARGIN, y + 4), caption, TEXT_PX)
        canvas.paste(legend, (MARGIN, y + lh + 4))
        y += lh + legend.height + 8
    return save_png(canvas, path)
