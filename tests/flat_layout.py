"""The layout the HAR dataset is distributed in, drawn with the demo's generator: the input of `prepare`."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from har_ref.demo.synthetic import CLASS_NAMES, render


def write_flat_csv_layout(out_dir: str | Path, per_class: int = 10, image_size: int = 32, seed: int = 0,
                          class_names: tuple[str, ...] = CLASS_NAMES) -> tuple[Path, Path]:
    """out_dir/images/Image_<k>.png (classes shuffled together) and out_dir/labels.csv with a
    `filename,label` header. Returns (csv_path, images_dir)."""
    images = Path(out_dir) / "images"
    images.mkdir(parents=True)
    labels = [name for name in class_names for _ in range(per_class)]
    order = np.random.default_rng(seed).permutation(len(labels))
    rows = []
    for k, j in enumerate(order, start=1):
        rng = np.random.default_rng([seed, CLASS_NAMES.index(labels[j]), int(j)])
        render(labels[j], rng, image_size).save(images / f"Image_{k}.png")
        rows.append((f"Image_{k}.png", labels[j]))
    csv_path = Path(out_dir) / "labels.csv"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([("filename", "label"), *rows])
    return csv_path, images
