"""Linear-probe baseline (CLIP sec. 3.2): logistic regression on frozen, L2-normalized image embeddings.

The image tower is frozen: every image is its unit embedding from the one scoring path
(embed.embed_images with the eval transform), the vector zero-shot scores against the class prompts.
(The CLIP paper probes the features before the projection, I_f; here the probe reads the embedding
every other number of the comparison is scored from.) A multinomial logistic regression (W [K, D],
b [K]) minimizes

    f(W, b) = sum_i CE(W x_i + b, y_i) + ||W||^2 / (2C)        (b not penalized)

scikit-learn's LogisticRegression(C=C) objective, which the CLIP paper fits (App. A.3, with C = 1/lambda,
L-BFGS capped at 1,000 iterations). C is chosen from C_GRID by macro-F1 (the study's headline metric)
on a seeded, class-stratified validation part of train (folders.hold_out; with seed 0 it is the part
`train --val-fraction` holds out). Ties, the rule on a small validation part that every C above
some value classifies perfectly, go to the lower validation cross-entropy: the loss f itself
minimizes, scored on images it did not fit. The probe is then refitted on all of train with that C
and scores the test split and the shifted test split. Its logits are the per-class scores of
predictions.csv, written by evaluate.write_split as every run's are, so `compare` and the report read
a probe run like any run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.folders import (DEFAULT_SHIFT_SPLIT, ImageFolderDataset, build_splits, hold_out, make_eval_loader,
                            split_items, write_skipped)
from ..model.config import MODEL_NAMES
from ..model.dual_encoder import load_model
from ..model.transforms import build_transform
from .embed import embed_images
from .evaluate import write_split
from .metrics import compute_metrics

C_GRID = tuple(10.0 ** (k / 2) for k in range(-4, 9))  # 1e-2 .. 1e4, two values per decade (13)
GRAD_TOL = 1e-7  # L-BFGS stops when max |gradient of f / N| (in the solver's coordinates) is below this
MAX_ITER = 1000  # L-BFGS iterations per fit, the CLIP paper's cap
HISTORY = 100  # L-BFGS memory: 2 x 100 vectors of K * D numbers cost little next to one gradient


def objective(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor, C: float) -> torch.Tensor:
    """f(W, b): summed cross-entropy + ||W||^2 / (2C), the bias unpenalized (sklearn's LogisticRegression)."""
    return F.cross_entropy(x @ W.T + b, y, reduction="sum") + W.pow(2).sum() / (2 * C)


def max_abs_grad(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor, C: float) -> float:
    """max |df/dW|, |df/db|: zero at the minimum."""
    W, b = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
    objective(W, b, x, y, C).backward()
    return max(W.grad.abs().max().item(), b.grad.abs().max().item())


@dataclass
class ProbeData:
    """Training embeddings in the coordinates the solver works in, computed once for every C of a grid.

    f is minimized in coordinates that change the variables exactly (same minimizer, same f):
    the features are centred, (x - mu) = U S V^T, and the mean goes into the unpenalized bias
    (W x + b = W (x - mu) + (b + W mu)); W = Z V^T, since the minimizer's rows lie in the span of
    the centred features (at the minimum W / C = -(P - Y)^T (X - mu)), and ||W|| = ||Z||. Each
    principal direction j is then scaled by h_j = sqrt(S_j^2 / N + K / (C N)): h_j^2 / K is the
    curvature of f / N along it at uniform probabilities (the cross-entropy's, about 1/K of the feature
    variance S_j^2 / N, plus the penalty's, 1 / (C N)). L-BFGS then sees about equal curvature in every
    direction (a diagonal preconditioner), so the nearly unregularized large-C fits, whose curvature
    spans the features' whole spectrum, converge in far fewer steps.
    """

    x: torch.Tensor  # [N, D] float64
    y: torch.Tensor  # [N] class ids
    num_classes: int
    mu: torch.Tensor  # [D] feature mean
    V: torch.Tensor  # [D, r] principal directions of the centred features, r = min(N, D)
    S: torch.Tensor  # [r] singular values
    z: torch.Tensor  # [N, r] centred features in those directions, (x - mu) V

    @classmethod
    def of(cls, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> "ProbeData":
        x = x.double()
        mu = x.mean(0)
        _, S, Vh = torch.linalg.svd(x - mu, full_matrices=False)
        return cls(x, torch.as_tensor(y, dtype=torch.long), num_classes, mu, Vh.T, S, (x - mu) @ Vh.T)


def fit_probe(data: ProbeData, C: float, start: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(W [K, D], b [K], {"iterations", "max_abs_grad"}) minimizing f with L-BFGS in float64, from zero or
    from `start` (the solution for the previous C of the grid: a regularization path). f is divided by
    N, so the stopping tolerance does not depend on the number of images; max_abs_grad is f's own."""
    n, K = len(data.x), data.num_classes
    h = (data.S ** 2 / n + K / (C * n)).sqrt()  # see ProbeData: sqrt(K x curvature) along each direction
    if start is None:
        Q = torch.zeros(K, len(h), dtype=torch.float64)
        c = torch.zeros(K, dtype=torch.float64)
    else:
        Q, c = (start[0] @ data.V) * h, start[1] + start[0] @ data.mu
    Q.requires_grad_(True)
    c.requires_grad_(True)
    optimizer = torch.optim.LBFGS([Q, c], lr=1, max_iter=MAX_ITER, tolerance_grad=GRAD_TOL, tolerance_change=0,
                                  history_size=HISTORY, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = objective(Q / h, c, data.z, data.y, C) / n  # Z = Q / h; ||W|| = ||Z||
        loss.backward()
        return loss

    optimizer.step(closure)
    iterations = optimizer.state[Q]["n_iter"]
    W = (Q.detach() / h) @ data.V.T
    b = c.detach() - W @ data.mu
    return W, b, {"iterations": iterations, "max_abs_grad": max_abs_grad(W, b, data.x, data.y, C)}


def choose_C(fit: ProbeData, x_val: torch.Tensor, y_val: np.ndarray, class_names: list[str],
             grid=C_GRID) -> tuple[dict, list[dict], dict]:
    """(the chosen C's record, every C's record, {C: (W, b)}): each C of `grid` fitted on `fit` (ascending,
    each from the previous solution) and scored on the validation part; chosen by macro-F1, ties to the
    lower mean cross-entropy."""
    records, solutions, start = [], {}, None
    for C in sorted(grid):
        W, b, info = fit_probe(fit, C, start)
        logits = x_val.double() @ W.T + b
        m = compute_metrics(y_val, logits.argmax(1).numpy(), class_names)
        records.append({"C": C, "val_macro_f1": m["macro_f1"], "val_accuracy": m["accuracy"],
                        "val_cross_entropy": F.cross_entropy(logits, torch.as_tensor(y_val)).item(), **info})
        solutions[C] = start = (W, b)
    best = max(records, key=lambda r: (r["val_macro_f1"], -r["val_cross_entropy"]))
    return best, records, solutions


def linear_probe(weights: str | Path, data_dir: str | Path, out_dir: str | Path,
                 shift_split: str | None = DEFAULT_SHIFT_SPLIT, seed: int = 0, val_fraction: float = 0.2,
                 batch_size: int = 64, workers: int = 0, device: str = "cpu", autocast=None,
                 grid=C_GRID) -> dict:
    """`python -m har_ref linear-probe`: the probe of a converted checkpoint or a run directory's image tower.
    Writes metrics.json and predictions.csv (and metrics_shift.json, predictions_shift.csv when
    DATA_DIR/<shift_split>/ exists) with the probe's record under "linear_probe"; returns the test
    split's metrics with the shift split's under "shift", as evaluate does. `autocast`: the image
    tower's precision (None: fp32), to score in the same precision as the runs it is compared with."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1) (the share of each class's train images that chooses "
                         f"C), got {val_fraction}.")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    model = load_model(weights, device=device)
    train_items, test_items, class_names = build_splits(data_dir)
    splits = [("test", "", test_items)]
    if shift_split and (data_dir / shift_split).is_dir():
        splits.append((shift_split, "_shift", split_items(data_dir, shift_split, class_names)))
    out_dir.mkdir(parents=True, exist_ok=True)

    def embed(items):
        dataset = ImageFolderDataset(items, build_transform(model.cfg, train=False))
        x, labels, indices = embed_images(model, make_eval_loader(dataset, batch_size, workers), autocast)
        return dataset, x.cpu().double(), labels, indices

    train, x, y, _ = embed(train_items)
    if train.skipped or (out_dir / "skipped.txt").is_file():
        write_skipped(out_dir, "train", train.skipped)
    held = {path for path, _ in hold_out(train_items, val_fraction, seed)[1]}
    is_val = np.array([path in held for path, _ in train.items])
    if not is_val.any():
        raise ValueError(f"{data_dir / 'train'}: no class has 2 readable images, so no validation part can be held "
                         "out to choose C; add train images.")
    start = time.perf_counter()
    best, records, solutions = choose_C(ProbeData.of(x[~is_val], y[~is_val], len(class_names)), x[is_val],
                                        y[is_val], class_names, grid)
    W, b, refit = fit_probe(ProbeData.of(x, y, len(class_names)), best["C"], solutions[best["C"]])
    record = {"method": "linear probe: multinomial logistic regression on frozen L2-normalized image embeddings",
              "weights": str(weights), "C": best["C"],
              "selected_by": "validation macro-F1, ties: lower validation cross-entropy", "grid": records,
              "seed": seed, "val_fraction": val_fraction, "train_images": len(x),
              "fit_images": int((~is_val).sum()), "val_images": int(is_val.sum()), "embed_dim": x.shape[1],
              "refit": refit, "fit_seconds": round(time.perf_counter() - start, 3)}

    family = model.cfg.family
    metrics = {}
    for split, suffix, items in splits:
        dataset, xs, ys, indices = embed(items)
        metrics[split] = write_split(out_dir, dataset, (xs @ W.T + b).numpy(), ys, indices, class_names, split,
                                     f"{MODEL_NAMES[family]} linear probe", family, suffix, {"linear_probe": record})
    result = metrics.pop("test")
    if metrics:
        result["shift"] = metrics.popitem()[1]
    return result
