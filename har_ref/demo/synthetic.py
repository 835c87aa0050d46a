"""Offline HAR-like image generator for the embedded demo (`python -m har_ref synth`).

Each of the 15 HAR actions is a cartoon scene (scenes.py) drawn with PIL.ImageDraw. Position,
scale, a small rotation, mirror, skin/hair/clothes colours, background
(floor, gradient, stripes, noise) and faded distractor shapes vary, so a model
must learn shapes rather than colours.

`variation` (0..1) scales those nuisances. A tiny ViT trained from scratch is very
sensitive to them (docs/benchmarks.md, "The synthetic images"), so the demo draws at 0.

Every image has its own numpy Generator seeded by (seed, split, class, index):
the same seed gives byte-identical files, and asking for more images never
changes the existing ones.
"""
from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .scenes import CLASS_NAMES, SCENES, Look, Shape, affine, hsv, random_look, rotation, shade

__all__ = ["CLASS_NAMES", "render", "draw_scene", "generate", "write_flat_csv_layout"]

SUPERSAMPLE = 2  # draw at 2x and box-downsample: anti-aliased edges at no extra dependency



# ---------------------------------------------------------------- rendering

def _background(rng, size: int, variation: float) -> Image.Image:
    base = hsv(rng.random(), rng.uniform(0.05, 0.6), rng.uniform(0.35, 0.95))
    img = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(img)
    style = rng.integers(3) if rng.random() < variation else 0
    if style == 1:  # vertical gradient
        other = shade(base, rng.uniform(0.6, 1.3))
        for y in range(0, size, 4):
            t = y / size
            draw.rectangle([0, y, size, y + 4], fill=tuple(int(a + (b - a) * t) for a, b in zip(base, other)))
    elif style == 2:  # wallpaper stripes
        step = int(rng.integers(size // 12, size // 5))
        for x in range(0, size, step):
            draw.rectangle([x, 0, x + step // 3, size], fill=shade(base, 0.85))
    horizon = int(size * rng.uniform(0.55, 0.85))
    draw.rectangle([0, horizon, size, size], fill=shade(base, rng.uniform(0.55, 0.85)))
    for _ in range(rng.integers(0, 3) if rng.random() < variation else 0):  # faded distractors
        color = tuple(int(0.6 * a + 0.4 * b) for a, b in zip(base, hsv(rng.random(), 0.6, rng.uniform(0.3, 1.0))))
        x, y = rng.uniform(0, size, 2)
        w, h = rng.uniform(0.08, 0.3, 2) * size
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + w, y + h], fill=color)
    return img


def _draw(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    pts = [tuple(p) for p in shape.pts]
    if shape.kind == "line":
        draw.line(pts, fill=shape.color, width=max(1, round(shape.w)))
        for x, y in pts:  # round joints and caps
            draw.ellipse([x - shape.w / 2, y - shape.w / 2, x + shape.w / 2, y + shape.w / 2], fill=shape.color)
    elif shape.kind == "poly":
        draw.polygon(pts, fill=shape.color)
    else:
        (x, y), r = pts[0], shape.r
        if shape.kind == "disc":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=shape.color)
        else:
            draw.ellipse([x - r, y - r, x + r, y + r], outline=shape.color, width=max(1, round(shape.w)))


@dataclass
class SceneFacts:
    """What a drawn scene shows besides its action, for captions (captions.py)."""
    looks: tuple[Look, Look]  # the person (and the second person of fighting / hugging)
    background: tuple  # RGB behind the people's heads
    mirrored: bool  # flipped left-right: the person faces left


def render(class_name: str, rng: np.random.Generator, image_size: int = 64, variation: float = 1.0) -> Image.Image:
    """One image of `class_name`, fully determined by the state of `rng`.

    `variation` in [0, 1] scales the nuisances: placement, size, rotation, clothes colours,
    background clutter and noise. At 0 the scene is centred at a fixed size in blue and brown
    clothes on a plain background (the pose, props, skin, hair, background colour and mirror
    still vary).
    """
    return draw_scene(class_name, rng, image_size, variation)[0]


def draw_scene(class_name: str, rng: np.random.Generator, image_size: int = 64,
               variation: float = 1.0) -> tuple[Image.Image, SceneFacts]:
    """`render`, also returning what it drew (the same draws from `rng`, so the same image)."""
    size = image_size * SUPERSAMPLE
    img = _background(rng, size, variation)
    bg = img.getpixel((size // 2, size // 4))
    looks = (random_look(rng, bg, variation), random_look(rng, bg, variation))
    shapes = SCENES[class_name](rng, *looks)
    shapes = affine(shapes, rotation(variation * rng.uniform(-6, 6)))
    lo = np.min([sh.pts.min(0) - sh.r - sh.w / 2 for sh in shapes], axis=0)
    hi = np.max([sh.pts.max(0) + sh.r + sh.w / 2 for sh in shapes], axis=0)
    scale = (0.9 - variation * rng.uniform(0, 0.18)) * size / (hi - lo).max()  # the scene fills 72-90%
    offset = (0.5 + variation * rng.uniform(-0.3, 0.3, 2)) * (size - scale * (hi - lo)) - scale * lo
    draw = ImageDraw.Draw(img)
    for shape in affine(shapes, np.eye(2) * scale, offset):
        _draw(draw, shape)
    img = img.reduce(SUPERSAMPLE)
    mirrored = bool(rng.random() < 0.5)
    if mirrored:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(img, np.float32) + rng.normal(0, variation * rng.uniform(2, 6), (image_size, image_size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), SceneFacts(looks, bg, mirrored)


def _rng(seed: int, split: str, class_id: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, ("train", "test", "flat").index(split), class_id, index])


def _prepare_out_dir(out_dir: Path, overwrite: bool, owned: tuple[str, ...]) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ValueError(f"{out_dir} is not empty: choose a new directory or pass overwrite=True (--overwrite).")
        for name in owned:
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def generate(out_dir: str | Path, train_per_class: int = 60, test_per_class: int = 20, image_size: int = 64,
             seed: int = 0, variation: float = 1.0, overwrite: bool = False) -> list[str]:
    """Write out_dir/{train,test}/<class>/NNNN.png for the 15 HAR classes; returns the class names.

    Same arguments, same bytes. With overwrite=True only
    out_dir/train and out_dir/test are replaced.
    """
    if min(train_per_class, test_per_class) < 1 or image_size < 16 or not 0 <= variation <= 1:
        raise ValueError(f"need at least 1 train and 1 test image per class, image_size >= 16 and variation in "
                         f"[0, 1], got {train_per_class}, {test_per_class}, {image_size} and {variation}.")
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite, ("train", "test"))
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for class_id, name in enumerate(CLASS_NAMES):
            folder = out_dir / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                render(name, _rng(seed, split, class_id, i), image_size, variation).save(folder / f"{i:04d}.png")
    return list(CLASS_NAMES)


def write_flat_csv_layout(out_dir: str | Path, per_class: int = 10, image_size: int = 32, seed: int = 0,
                          class_names: tuple[str, ...] = CLASS_NAMES, overwrite: bool = False) -> tuple[Path, Path]:
    """The layout the HAR dataset is distributed in: out_dir/images/Image_<k>.png (classes shuffled
    together) and out_dir/labels.csv with a `filename,label` header. Returns (csv_path, images_dir)."""
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite, ("images", "labels.csv"))
    images = out_dir / "images"
    images.mkdir()
    labels = [name for name in class_names for _ in range(per_class)]
    order = np.random.default_rng(seed).permutation(len(labels))
    rows = []
    for k, j in enumerate(order, start=1):
        name = labels[j]
        render(name, _rng(seed, "flat", CLASS_NAMES.index(name), int(j)), image_size).save(images / f"Image_{k}.png")
        rows.append((f"Image_{k}.png", name))
    csv_path = out_dir / "labels.csv"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([("filename", "label"), *rows])
    return csv_path, images
