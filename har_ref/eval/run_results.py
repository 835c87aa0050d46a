"""A run directory read back for comparison: metrics.json, predictions.csv and log.jsonl, and two
runs' predictions aligned image by image (by path), so both models are scored on the same images.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class RunResults:
    """One run directory's test predictions (rows in predictions.csv order) and training log."""

    directory: Path
    name: str  # "CLIP" / "SigLIP" from metrics.json
    family: str
    class_names: list[str]
    paths: list[str]
    true: list[str]
    pred: list[str]
    scores: np.ndarray  # [N, K] logits
    log: list[dict] | None  # one record per epoch, None without log.jsonl
    synthetic: bool
    skipped_images: int
    wise_ft: list[dict] | None = None  # [{alpha, accuracy, macro_f1}] from wise_ft_curve.json (the demo writes it)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: compare needs run directories written by "
                                "`python -m har_ref train` or `python -m har_ref evaluate`.")
    return json.loads(path.read_text())


def read_predictions(path: Path) -> tuple[list[str], list[list[str]], np.ndarray]:
    """(class names, rows [path, true, pred], scores [N, K]) from a predictions.csv."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python -m har_ref evaluate` to write it.")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header = rows[0] if rows else []
    if header[:3] != ["path", "true", "pred"] or not all(h.startswith("score_") for h in header[3:]):
        raise ValueError(f"{path} does not have the header path,true,pred,score_<class>...; "
                         "re-create it with `python -m har_ref evaluate`.")
    class_names = [h[len("score_"):] for h in header[3:]]
    body = rows[1:]
    scores = np.array([[float(s) for s in row[3:]] for row in body], dtype=np.float64).reshape(len(body), -1)
    return class_names, [row[:3] for row in body], scores


def read_log(path: Path) -> list[dict] | None:
    """Per-epoch records of log.jsonl sorted by epoch; a resumed epoch keeps its last record."""
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_epoch = {int(r["epoch"]): r for r in records}
    return [by_epoch[e] for e in sorted(by_epoch)] or None


def load_run(directory: str | Path, suffix: str = "") -> RunResults:
    """A run directory's test split (suffix "") or shifted test split (suffix "_shift") read back."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"RunResults directory {directory} does not exist; pass the --out folder of a "
                                "train or evaluate run.")
    metrics = _read_json(directory / f"metrics{suffix}.json")
    class_names, rows, scores = read_predictions(directory / f"predictions{suffix}.csv")
    train_config_path = directory / "train_config.json"
    train_config = json.loads(train_config_path.read_text()) if train_config_path.is_file() else {}
    return RunResults(directory=directory, name=metrics["model_name"], family=metrics["family"],
               class_names=class_names, paths=[r[0] for r in rows], true=[r[1] for r in rows],
               pred=[r[2] for r in rows], scores=scores, log=read_log(directory / "log.jsonl"),
               synthetic=bool(train_config.get("synthetic", False)),
               skipped_images=len(metrics.get("skipped_images", [])),
               wise_ft=_read_json(directory / "wise_ft_curve.json")["curve"] if (directory / "wise_ft_curve.json").is_file()
               else None)


def align(a: RunResults, b: RunResults) -> np.ndarray:
    """Row order of b that puts b's images in a's order; errors unless both hold the same test set."""
    where = f"{a.directory} and {b.directory}"
    if a.class_names != b.class_names:
        raise ValueError(f"The runs in {where} have different classes ({a.class_names} vs {b.class_names}); "
                         "compare runs evaluated on the same dataset.")
    for run in (a, b):
        if len(set(run.paths)) != len(run.paths):
            raise ValueError(f"{run.directory / 'predictions.csv'} lists an image twice; re-run evaluate.")
    row_of_b = {path: i for i, path in enumerate(b.paths)}
    only_a, only_b = set(a.paths) - set(row_of_b), set(row_of_b) - set(a.paths)
    if only_a or only_b:
        example = sorted(only_a or only_b)[0]
        raise ValueError(f"The test sets in {where} differ ({len(only_a)} image(s) only in the first, "
                         f"{len(only_b)} only in the second, e.g. {example}); evaluate both models on the "
                         "same data directory.")
    order = np.array([row_of_b[path] for path in a.paths], dtype=np.int64)
    mismatched = [p for p, t, i in zip(a.paths, a.true, order) if b.true[i] != t]
    if mismatched:
        raise ValueError(f"The runs in {where} disagree on the true class of {len(mismatched)} image(s) "
                         f"(e.g. {mismatched[0]}); evaluate both models on the same data directory.")
    return order
