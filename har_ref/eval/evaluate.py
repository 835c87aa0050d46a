"""Zero-shot / fine-tuned evaluation: class prompts vs test images, metrics.json, predictions.csv.

Classification as image-text matching (CLIP sec. 3.1.2): each class is the mean of its
L2-normalized template embeddings (the prompt ensemble, CLIP sec. 3.1.4), renormalized;
an image is assigned the class whose embedding scores highest. Scores are the model's own
logits, exp(t) * cos (+ b when it has one: SigLIP, or CLIP towers trained with the sigmoid loss).
metrics.json names the run by towers and loss (ModelConfig.name) and records the loss and the
probability rule it trains (`predict` prints those probabilities: softmax for InfoNCE, sigmoid for
the sigmoid loss). Calibration (ECE, reliability diagram) uses the softmax over the K class logits
for every run, so all are compared on one footing: under InfoNCE it is the distribution the loss
trains; under the sigmoid loss it is a choice of this comparison (b cancels in it).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ..data.folders import (DEFAULT_SHIFT_SPLIT, ImageFolderDataset, build_splits, make_eval_loader, split_items,
                            write_skipped)
from ..data.prompts import PromptBank
from ..model.config import PROBABILITY_KIND
from ..model.dual_encoder import DualEncoder, load_model
from ..model.tokenizer import load_tokenizer
from ..model.transforms import build_transform
from .embed import class_embeddings, image_scores
from .heatmaps import plot_confusion
from .metrics import compute_metrics, expected_calibration_error, reliability_diagram_data, softmax


def write_predictions(path: Path, items, indices, logits, class_names) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "pred"] + [f"score_{c}" for c in class_names])
        pred = logits.argmax(1)
        for row, idx in enumerate(indices):
            file, label = items[idx]
            w.writerow([str(file), class_names[label], class_names[pred[row]]]
                       + [f"{s:.6g}" for s in logits[row]])


def evaluate_model(model: DualEncoder, tokenizer, data_dir: str | Path, out_dir: str | Path,
                   prompts: str | Path | None = None, batch_size: int = 64, workers: int = 0,
                   split: str = "test", label: str | None = None, autocast=None, suffix: str = "") -> dict:
    """Score DATA_DIR/<split>/, write metrics<suffix>.json, predictions<suffix>.csv and
    confusion<suffix>.png to OUT_DIR (the shift split's suffix is "_shift")."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_items, test_items, class_names = build_splits(data_dir)
    items = {"train": train_items, "test": test_items}.get(split) or split_items(data_dir, split, class_names)
    dataset = ImageFolderDataset(items, build_transform(model.cfg, train=False))
    loader = make_eval_loader(dataset, batch_size=batch_size, workers=workers)
    bank = PromptBank.from_file(prompts, class_names)
    model.eval()
    logits, y_true, indices = image_scores(model, loader, class_embeddings(model, tokenizer, bank, class_names),
                                           autocast)
    return write_split(out_dir, dataset, logits, y_true, indices, class_names, split, label or model.cfg.name,
                       model.cfg.family, suffix, {"loss": model.cfg.loss, "probability": PROBABILITY_KIND[model.cfg.loss]})


def write_split(out_dir: Path, dataset: ImageFolderDataset, logits: np.ndarray, y_true: np.ndarray,
                indices: np.ndarray, class_names: list[str], split: str, model_name: str, family: str,
                suffix: str = "", extra: dict | None = None) -> dict:
    """One scored split into a run directory: metrics<suffix>.json (with `extra` merged in),
    predictions<suffix>.csv (the per-class scores are `logits`), confusion<suffix>.png, and the split's
    unreadable files in skipped.txt. Every way of scoring (zero-shot, fine-tuned, linear probe) writes here.
    metrics<suffix>.json is written last: once it exists, the split is complete (train --resume auto relies on it)."""
    metrics = compute_metrics(y_true, logits.argmax(1), class_names)
    probs = softmax(logits)
    metrics["ece"] = expected_calibration_error(probs, y_true, n_bins=15)
    metrics["reliability"] = reliability_diagram_data(probs, y_true, n_bins=15)
    metrics["model_name"] = model_name
    metrics["family"] = family
    metrics["split"] = split
    metrics["skipped_images"] = [[str(p), r] for p, r in dataset.skipped]
    metrics.update(extra or {})
    if dataset.skipped or (out_dir / "skipped.txt").is_file():
        write_skipped(out_dir, split, dataset.skipped)
    write_predictions(out_dir / f"predictions{suffix}.csv", dataset.items, indices, logits, class_names)
    plot_confusion(np.asarray(metrics["confusion_normalized"]), class_names,
                   f"Confusion matrix (normalized): {model_name}, {split}", out_dir / f"confusion{suffix}.png")
    (out_dir / f"metrics{suffix}.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def evaluate_test_splits(model: DualEncoder, tokenizer, data_dir: str | Path, out_dir: str | Path,
                         prompts: str | Path | None = None, batch_size: int = 64, workers: int = 0,
                         autocast=None, shift_split: str | None = DEFAULT_SHIFT_SPLIT) -> dict:
    """The test split (metrics.json, predictions.csv) and, when DATA_DIR/<shift_split>/ exists, the
    shifted test split (metrics_shift.json, predictions_shift.csv), scored the same way; returns the
    test split's metrics with the shift split's under "shift"."""
    metrics = evaluate_model(model, tokenizer, data_dir, out_dir, prompts, batch_size, workers,
                             autocast=autocast)
    if shift_split and (Path(data_dir) / shift_split).is_dir():
        metrics["shift"] = evaluate_model(model, tokenizer, data_dir, out_dir, prompts, batch_size, workers,
                                          split=shift_split, autocast=autocast, suffix="_shift")
    return metrics


def evaluate(weights: str | Path, data_dir: str | Path, out_dir: str | Path, prompts=None,
             batch_size: int = 64, workers: int = 0, device: str = "cpu", autocast=None,
             shift_split: str | None = DEFAULT_SHIFT_SPLIT) -> dict:
    """`python -m har_ref evaluate`: a converted pretrained checkpoint (zero-shot) or a run directory
    (scored with the template bank it was trained with, its prompts.json, unless --prompts is given).
    `autocast`: the image tower's precision context (None: fp32), e.g. to match a training run's."""
    model = load_model(weights, device=device)
    if prompts is None and (Path(weights) / "prompts.json").is_file():
        prompts = Path(weights) / "prompts.json"
    return evaluate_test_splits(model, load_tokenizer(weights), data_dir, out_dir, prompts, batch_size, workers,
                                autocast=autocast, shift_split=shift_split)
