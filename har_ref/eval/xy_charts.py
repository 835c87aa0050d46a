"""Charts on x-y axes, drawn with Pillow alone: line charts (loss curves, WiSE-FT curves) and bar charts
(epoch times, reliability diagrams).

Axes, ticks and legends are measured from the text they hold (drawing.py's primitives); CLIP is always
blue and SigLIP orange, in every chart.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .drawing import (AXIS_GREY, AXIS_TITLE_PX, FAINT_GREY, GRID_GREY, MARGIN, TEXT_PX, TITLE_PX, WHITE, Box,
                      draw_text, font, line_height, nice_ticks, paste_vertical_text, save_png, text_width,
                      tick_decimals)

CLIP_COLOR = (31, 119, 180)  # blue
SIGLIP_COLOR = (230, 110, 0)  # orange
EXTRA_COLORS = ((44, 160, 44), (148, 103, 189), (140, 86, 75), (227, 119, 194))


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
    legend_w = _legend_width(legend)
    plot_w = max(plot_size[0], legend_w - left)  # a legend wider than the plot widens the plot, not a margin
    area = (left, top, left + plot_w, top + plot_size[1])
    x_label_w = max(text_width(s, TEXT_PX) for s in x_labels)
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
    paste_vertical_text(canvas, y_title, AXIS_TITLE_PX, MARGIN + line_height(AXIS_TITLE_PX) // 2,
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
    digits = tick_decimals(y_ticks)
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
    digits = tick_decimals(y_ticks)
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


def plot_wise_ft(curves: dict[str, Sequence[tuple[float, float, float]]], path,
                 title: str = "WiSE-FT: accuracy in distribution and under shift") -> Image.Image:
    """As the WiSE-FT paper draws it (Wortsman et al. 2022, fig. 1): one curve per model through its
    weight-space mixes, (alpha, ID accuracy, shift accuracy) points, ID accuracy on x, shift accuracy on
    y. Both axes share one scale from a round value below the lowest point to 1, so a small gap looks
    small; the dashed diagonal is shift = ID. The ends are labelled zero-shot and fine-tuned, alpha 0.5
    is marked, and every point is one alpha."""
    if not curves or not all(len(curve) for curve in curves.values()):
        raise ValueError("plot_wise_ft needs at least one model with at least one (alpha, ID, shift) point.")
    colors = model_colors(list(curves))
    lowest = min(v for curve in curves.values() for _, x, y in curve for v in (x, y))
    lo = max(0.0, math.floor(lowest * 10 - 0.5) / 10)
    ticks = nice_ticks(lo, 1.0)
    ticks = [t for t in ticks if lo - 1e-9 <= t <= 1.0 + 1e-9]
    labels = [f"{t:.{tick_decimals(ticks)}f}" for t in ticks]
    legend = [(name, colors[name], "line") for name in curves] + [("shift = ID", FAINT_GREY, "dashed")]
    chart = _new_chart(title, legend, ticks, ticks, labels, labels, "ID test accuracy",
                       "Shifted test accuracy", (lo, 1.0), (lo, 1.0), plot_size=(480, 480))
    draw = ImageDraw.Draw(chart.canvas)
    _dashed_line(draw, chart.px(lo, lo), chart.px(1.0, 1.0), FAINT_GREY)
    for name, curve in curves.items():
        points = sorted(curve)
        _polyline(draw, [chart.px(x, y) for _, x, y in points], colors[name])
    for name, curve in curves.items():  # labels after every line, on white, below the rising curves
        for alpha, x, y in curve:
            label = {0.0: "zero-shot", 1.0: "fine-tuned", 0.5: "alpha 0.5"}.get(round(alpha, 6))
            if label:
                px, py = chart.px(x, y)
                draw.ellipse((px - 6, py - 6, px + 6, py + 6), outline=colors[name], width=2)
                at, anchor = ((round(px) - 8, round(py) + 6), "rt") if alpha == 0 else ((round(px) + 8, round(py) + 6), "lt")
                draw.rectangle(draw.textbbox(at, label, font=font(TEXT_PX), anchor=anchor), fill=WHITE)
                draw_text(draw, at, label, TEXT_PX, fill=colors[name], anchor=anchor)
    return save_png(chart.canvas, path)


def plot_lines_with_bands(series: dict[str, Sequence[tuple[float, float, float, float]]], path, title: str,
                          x_title: str, y_title: str, log_x: bool = False,
                          colors: dict[str, tuple[int, int, int]] | None = None) -> Image.Image:
    """One line per series through its (x, y, lo, hi) points in x order, over a shaded band from lo to hi
    (a 95% CI, say), each point's own lo..hi drawn as a whisker. With `log_x` the x axis is log10, its
    ticks at 1, 2 and 5 times a power of 10. `colors` (series name -> RGB) overrides model_colors."""
    if not series or not all(len(points) for points in series.values()):
        raise ValueError("plot_lines_with_bands needs at least one series with at least one (x, y, lo, hi) point.")
    xs = [p[0] for points in series.values() for p in points]
    if log_x and min(xs) <= 0:
        raise ValueError(f"plot_lines_with_bands: a log x axis needs positive x, got {min(xs)}.")
    fx = math.log10 if log_x else float
    pad = (fx(max(xs)) - fx(min(xs))) * 0.06 or 0.5
    x_range = (fx(min(xs)) - pad, fx(max(xs)) + pad)
    if log_x:  # 1, 2, 5 x 10^k; powers of 2 where those are too few (a range within a decade); else the x values
        ticks = [m * 10.0 ** e for e in range(math.floor(x_range[0]), math.ceil(x_range[1]) + 1) for m in (1, 2, 5)
                 if x_range[0] <= math.log10(m * 10.0 ** e) <= x_range[1]]
        if len(ticks) < 3:
            log2 = math.log10(2)
            octaves = range(math.floor(x_range[0] / log2), math.ceil(x_range[1] / log2) + 1)
            ticks = [2.0 ** e for e in octaves if x_range[0] <= e * log2 <= x_range[1]]
        if len(ticks) < 2:  # within an octave: the data's own x values
            ticks = sorted(set(xs))
    else:
        ticks = [t for t in nice_ticks(*x_range) if x_range[0] <= t <= x_range[1]] or sorted(set(xs))
    ys = [v for points in series.values() for _, y, lo, hi in points for v in (y, lo, hi)]
    y_ticks = nice_ticks(min(ys), max(ys))
    digits = tick_decimals(y_ticks)
    colors = {**model_colors(list(series)), **(colors or {})}
    chart = _new_chart(title, [(name, colors[name], "line") for name in series], [fx(t) for t in ticks], y_ticks,
                       [f"{t:g}" for t in ticks], [f"{t:.{digits}f}" for t in y_ticks], x_title, y_title, x_range,
                       (y_ticks[0], y_ticks[-1]))
    overlay = Image.new("RGBA", chart.canvas.size, (0, 0, 0, 0))
    bands = ImageDraw.Draw(overlay)
    for name, points in series.items():
        points = sorted(points)
        if len(points) > 1:
            edge = [chart.px(fx(x), hi) for x, _, _, hi in points] + [chart.px(fx(x), lo) for x, _, lo, _ in points[::-1]]
            bands.polygon(edge, fill=colors[name] + (56,))
    chart.canvas.paste(Image.alpha_composite(chart.canvas.convert("RGBA"), overlay).convert("RGB"))
    draw = ImageDraw.Draw(chart.canvas)
    for name, points in series.items():
        points = sorted(points)
        for x, _, lo, hi in points:
            draw.line([chart.px(fx(x), lo), chart.px(fx(x), hi)], fill=colors[name], width=2)
        _polyline(draw, [chart.px(fx(x), y) for x, y, _, _ in points], colors[name])
    return save_png(chart.canvas, path)
