"""Evaluation metrics in plain numpy: P/R/F1, confusion, calibration, significance.

Labels are integer class indices into `class_names`. Every number follows
scikit-learn's conventions so that results can be cross-checked line by line:
per-class scores with `zero_division=0`, macro averages over ALL classes in
`class_names` (sklearn's `labels=range(K)`), so a class missing from both the
truth and the predictions counts as an F1 of 0, not as absent.

Everything returned is a plain python float/int/list/dict, so the dicts can be
written to metrics.json as they are.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import numpy as np

# Bootstrap resamples are processed in chunks so that the [chunk, N] index
# matrix stays small (1000 x 2000 int64 = 16 MB) whatever n_resamples is.
_BOOTSTRAP_CHUNK = 1000


def _check_labels(y_true, y_pred, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape:
        raise ValueError(
            f"y_true and y_pred must be 1-D arrays of the same length, got shapes "
            f"{y_true.shape} and {y_pred.shape}; pass one class index per test image."
        )
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes):
            raise ValueError(
                f"{name} must hold integer class indices in [0, {num_classes}), "
                f"got values from {y.min()} to {y.max()}; map class names to indices first."
            )
    return y_true.astype(np.int64), y_pred.astype(np.int64)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, with 0 where the denominator is 0 (sklearn's zero_division=0)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros(np.broadcast(numerator, denominator).shape)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """[K, K] int counts, rows = true class, columns = predicted class."""
    flat = y_true * num_classes + y_pred
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _precision_recall_f1(tp: np.ndarray, true_sum: np.ndarray, pred_sum: np.ndarray):
    """Per-class scores from counts; works on [K] or batched [R, K] arrays.

    F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (true_sum + pred_sum), the form
    sklearn uses; it equals the harmonic mean of P and R whenever both exist.
    """
    precision = _safe_divide(tp, pred_sum)
    recall = _safe_divide(tp, true_sum)
    f1 = _safe_divide(2 * tp, true_sum + pred_sum)
    return precision, recall, f1


def compute_metrics(y_true, y_pred, class_names: Sequence[str]) -> dict:
    """Accuracy, macro P/R/F1, per-class scores and confusion matrices (the metrics.json dict)."""
    num_classes = len(class_names)
    y_true, y_pred = _check_labels(y_true, y_pred, num_classes)
    if y_true.size == 0:
        raise ValueError("compute_metrics got no predictions; the test set must hold at least one image.")
    confusion = confusion_counts(y_true, y_pred, num_classes)
    tp = np.diag(confusion)
    true_sum = confusion.sum(axis=1)
    pred_sum = confusion.sum(axis=0)
    precision, recall, f1 = _precision_recall_f1(tp, true_sum, pred_sum)
    confusion_normalized = _safe_divide(confusion, true_sum[:, None])  # empty row -> zeros
    return {
        "num_samples": int(y_true.size),
        "accuracy": float(tp.sum() / y_true.size),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "per_class": {
            name: {
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
                "support": int(true_sum[k]),
            }
            for k, name in enumerate(class_names)
        },
        "confusion": confusion.tolist(),
        "confusion_normalized": confusion_normalized.tolist(),
    }


# ---------------------------------------------------------------------------- calibration


def softmax(logits, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax: subtracting the row max leaves the result unchanged."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


def _calibration_bins(probs, y_true, n_bins: int):
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true)
    if probs.ndim != 2 or probs.shape[0] != y_true.shape[0] or probs.shape[0] == 0:
        raise ValueError(
            f"probs must be [N, K] with one row per label, got probs {probs.shape} and "
            f"y_true {y_true.shape}; pass softmax probabilities for the same test images."
        )
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Guo et al. 2017, Sec. 2: bin B_m holds confidences in ((m-1)/M, m/M];
    # digitize(right=True) on the inner edges gives exactly that (0 goes to bin 0).
    bin_index = np.digitize(confidence, edges[1:-1], right=True)
    count = np.bincount(bin_index, minlength=n_bins)
    accuracy = _safe_divide(np.bincount(bin_index, weights=correct, minlength=n_bins), count)
    mean_confidence = _safe_divide(np.bincount(bin_index, weights=confidence, minlength=n_bins), count)
    return edges, accuracy, mean_confidence, count


def expected_calibration_error(probs, y_true, n_bins: int = 15) -> float:
    """ECE = sum_m |B_m|/N * |acc(B_m) - conf(B_m)|  (Guo et al. 2017, Eq. 3)."""
    _, accuracy, confidence, count = _calibration_bins(probs, y_true, n_bins)
    return float(np.sum(count / count.sum() * np.abs(accuracy - confidence)))


def reliability_diagram_data(probs, y_true, n_bins: int = 15) -> dict:
    """Per-bin accuracy, mean confidence and count; empty bins have count 0 and zeros."""
    edges, accuracy, confidence, count = _calibration_bins(probs, y_true, n_bins)
    ece = float(np.sum(count / count.sum() * np.abs(accuracy - confidence)))
    return {
        "bin_edges": edges.tolist(),
        "accuracy": accuracy.tolist(),
        "confidence": confidence.tolist(),
        "count": count.astype(int).tolist(),
        "ece": ece,
    }


# ---------------------------------------------------------------------------- significance


def bootstrap_indices(rng: np.random.Generator, n_items: int, n_resamples: int):
    """Yield [chunk, n_items] resample indices, row r = the images drawn for resample r.

    Concatenated, the chunks equal one rng.integers(0, n_items, (n_resamples, n_items))
    call (numpy continues the same stream), which is how the tests replicate it.
    """
    for start in range(0, n_resamples, _BOOTSTRAP_CHUNK):
        size = min(_BOOTSTRAP_CHUNK, n_resamples - start)
        yield rng.integers(0, n_items, size=(size, n_items))


def _batched_scores(y_true_idx: np.ndarray, y_pred_idx: np.ndarray, num_classes: int):
    """Macro-F1 and accuracy of each resample row, from per-row class counts via one bincount each."""
    rows, n_items = y_true_idx.shape
    row_offset = np.arange(rows)[:, None] * num_classes
    size = rows * num_classes

    def per_row_class_counts(labels: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        flat = (row_offset + labels).ravel()
        w = None if weights is None else weights.ravel()
        return np.bincount(flat, weights=w, minlength=size).reshape(rows, num_classes)

    correct = y_true_idx == y_pred_idx
    tp = per_row_class_counts(y_true_idx, correct)
    true_sum = per_row_class_counts(y_true_idx)
    pred_sum = per_row_class_counts(y_pred_idx)
    _, _, f1 = _precision_recall_f1(tp, true_sum, pred_sum)
    return f1.mean(axis=1), tp.sum(axis=1) / n_items


def _difference_summary(observed_a: float, observed_b: float, differences: np.ndarray) -> dict:
    ci_low, ci_high = np.percentile(differences, [2.5, 97.5])
    return {
        "a": float(observed_a),
        "b": float(observed_b),
        "difference": float(observed_b - observed_a),
        "ci95_low": float(ci_low),
        "ci95_high": float(ci_high),
        "fraction_difference_le_0": float(np.mean(differences <= 0)),
    }


def _seed_rows(y_true, pred, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Predictions as [S, N] (one row per seed; a 1-D array is one seed), checked against y_true [N]."""
    pred = np.asarray(pred)
    rows = pred.reshape(1, -1) if pred.ndim == 1 else pred
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(f"predictions must be [N] or [seeds, N] class indices, got shape {pred.shape}.")
    checked = [_check_labels(y_true, row, num_classes) for row in rows]
    return checked[0][0], np.stack([p for _, p in checked])


def paired_bootstrap(
    y_true,
    pred_a,
    pred_b,
    class_names: Sequence[str],
    n_resamples: int = 10_000,
    seed: int = 0,
) -> dict:
    """Paired bootstrap of (model b - model a) on macro-F1 and accuracy over the same test images.

    Each resample draws N test images with replacement and scores both models on
    that same draw, so the CI reflects the paired design (Efron & Tibshirani 1993;
    Koehn 2004). `fraction_difference_le_0` estimates how often b fails to beat a
    (a one-sided bootstrap p-value for "b > a"). A positive difference means b is better.

    Several seeds: pred_a and pred_b may be [S, N], row k of each a run with seed k. Every
    resample then scores each seed pair on the SAME draw of images and averages the S
    differences, so the CI covers the test images' sampling of the mean over seeds.
    """
    num_classes = len(class_names)
    y_true, pred_a = _seed_rows(y_true, pred_a, num_classes)
    _, pred_b = _seed_rows(y_true, pred_b, num_classes)
    if pred_a.shape != pred_b.shape:
        raise ValueError(f"pred_a and pred_b must pair seed by seed, got shapes {pred_a.shape} and {pred_b.shape}.")
    if y_true.size == 0 or n_resamples < 1:
        raise ValueError("paired_bootstrap needs at least one test image and one resample.")
    observed = {name: np.mean([[m["macro_f1"], m["accuracy"]]
                               for m in (compute_metrics(y_true, row, class_names) for row in pred)], axis=0)
                for name, pred in (("a", pred_a), ("b", pred_b))}
    rng = np.random.default_rng(seed)
    f1_diffs, acc_diffs = [], []
    for idx in bootstrap_indices(rng, y_true.size, n_resamples):
        f1_diff, acc_diff = 0.0, 0.0
        for row_a, row_b in zip(pred_a, pred_b):  # the same draw for every seed pair
            f1_a, acc_a = _batched_scores(y_true[idx], row_a[idx], num_classes)
            f1_b, acc_b = _batched_scores(y_true[idx], row_b[idx], num_classes)
            f1_diff, acc_diff = f1_diff + (f1_b - f1_a), acc_diff + (acc_b - acc_a)
        f1_diffs.append(f1_diff / len(pred_a))
        acc_diffs.append(acc_diff / len(pred_a))
    return {
        "direction": "b - a",
        "n_resamples": int(n_resamples),
        "seed": int(seed),
        "seeds": int(len(pred_a)),
        "macro_f1": _difference_summary(observed["a"][0], observed["b"][0], np.concatenate(f1_diffs)),
        "accuracy": _difference_summary(observed["a"][1], observed["b"][1], np.concatenate(acc_diffs)),
    }


def bootstrap_ci(y_true, pred, class_names: Sequence[str], n_resamples: int = 10_000, seed: int = 0) -> dict:
    """95% percentile bootstrap CI of one model's macro-F1 and accuracy (the mean over seeds when
    pred is [S, N]; every seed scored on the same draw of test images, as in paired_bootstrap)."""
    num_classes = len(class_names)
    y_true, pred = _seed_rows(y_true, pred, num_classes)
    if y_true.size == 0 or n_resamples < 1:
        raise ValueError("bootstrap_ci needs at least one test image and one resample.")
    rng = np.random.default_rng(seed)
    f1s, accs = [], []
    for idx in bootstrap_indices(rng, y_true.size, n_resamples):
        scores = [_batched_scores(y_true[idx], row[idx], num_classes) for row in pred]
        f1s.append(np.mean([f1 for f1, _ in scores], axis=0))
        accs.append(np.mean([acc for _, acc in scores], axis=0))
    out = {}
    for name, resampled in (("macro_f1", np.concatenate(f1s)), ("accuracy", np.concatenate(accs))):
        observed = np.mean([compute_metrics(y_true, row, class_names)[name] for row in pred])
        low, high = np.percentile(resampled, [2.5, 97.5])
        out[name] = {"value": float(observed), "ci95": [float(low), float(high)]}
    return out


def mcnemar_exact(y_true, pred_a, pred_b) -> dict:
    """Exact McNemar test on the discordant pairs of two models scored on the same images.

    b = a right & b wrong, c = a wrong & b right. Under H0 the b+c discordant
    images split 50/50, so p = min(1, 2 * P[Binomial(b+c, 1/2) <= min(b, c)]).
    The sum is done in exact integer arithmetic (math.comb), so n ~ 2000 is safe.
    With [S, N] predictions (seed k of a against seed k of b) the discordant pairs are
    pooled over the S seed pairs.
    """
    y_true, pred_a, pred_b = (np.asarray(v) for v in (y_true, pred_a, pred_b))
    if y_true.ndim != 1 or pred_a.shape != pred_b.shape or pred_a.shape[-1:] != y_true.shape or pred_a.ndim > 2:
        raise ValueError(
            f"y_true must be 1-D and pred_a, pred_b [N] or [seeds, N] with the same shape, got {y_true.shape}, "
            f"{pred_a.shape}, {pred_b.shape}; score both models on the same test images."
        )
    a_right = pred_a == y_true
    b_right = pred_b == y_true
    b = int(np.sum(a_right & ~b_right))
    c = int(np.sum(~a_right & b_right))
    n = b + c
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    p_value = min(Fraction(1), Fraction(2 * tail, 2**n))
    return {"b": b, "c": c, "n_discordant": n, "p_value": float(p_value)}
