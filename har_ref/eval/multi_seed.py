"""Scores of runs repeated over seeds, and the difference of two such run sets, with their uncertainty.

A "run set" is one setting trained (or evaluated) once per seed: its run directories' predictions on
the same test images. What this module returns, per split ("" the test split, "_shift" the shifted one):

- `score(runs)`: the mean macro-F1 and accuracy over seeds, each seed's value, their sd, and a 95%
  percentile bootstrap CI of the mean over seeds (metrics.py::bootstrap_ci: one draw of test images
  scores every seed, so the CI covers the test sample; the sd over seeds covers training randomness).
- `difference(runs_a, runs_b)`: b - a, its 95% CI from a paired bootstrap over the test images with the
  same draw for every seed pair (seed k of a against seed k of b), and the exact McNemar p on the
  discordant pairs pooled over seed pairs (metrics.py::paired_bootstrap, metrics.py::mcnemar_exact).

A run set of one run (a zero-shot evaluation, a linear probe) is paired with every seed of the other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .metrics import bootstrap_ci, compute_metrics, mcnemar_exact, paired_bootstrap
from .run_results import RunResults, align, load_run

N_RESAMPLES = 2000  # bootstrap resamples: the CI bounds move by < 0.002 between seeds of the resampler


def predictions(runs: Sequence[str | Path], suffix: str = "", reference: RunResults | None = None
                ) -> tuple[np.ndarray, np.ndarray, list[str], RunResults]:
    """(y_true [N], predictions [S, N], class names, the reference run) with every run's rows put in the
    reference's image order (the first run's, unless given); errors unless all hold the same images."""
    loaded = [load_run(r, suffix) for r in runs]
    reference = reference or loaded[0]
    index = {name: k for k, name in enumerate(reference.class_names)}
    y_true = np.array([index[t] for t in reference.true], dtype=np.int64)
    rows = []
    for run in loaded:
        order = align(reference, run)
        rows.append([index[run.pred[i]] for i in order])
    return y_true, np.array(rows, dtype=np.int64), reference.class_names, reference


def score(runs: Sequence[str | Path], suffix: str = "", seed: int = 0) -> dict:
    """{"macro_f1": mean, "accuracy": mean, "ci95": [lo, hi] of macro-F1, "seeds_macro_f1": [...],
    "sd_macro_f1": sd over seeds (0 for one run)}."""
    y_true, pred, class_names, _ = predictions(runs, suffix)
    ci = bootstrap_ci(y_true, pred, class_names, N_RESAMPLES, seed)
    per_seed = [compute_metrics(y_true, p, class_names)["macro_f1"] for p in pred]
    return {"macro_f1": ci["macro_f1"]["value"], "accuracy": ci["accuracy"]["value"],
            "ci95": ci["macro_f1"]["ci95"], "seeds_macro_f1": per_seed,
            "sd_macro_f1": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0}


def difference(runs_a: Sequence[str | Path], runs_b: Sequence[str | Path], suffix: str = "", seed: int = 0) -> dict:
    """b - a on macro-F1: {"macro_f1": d, "ci95": [lo, hi], "mcnemar_p": p, "accuracy": d}."""
    y_true, pred_a, class_names, reference = predictions(runs_a, suffix)
    _, pred_b, _, _ = predictions(runs_b, suffix, reference)
    if len(pred_a) != len(pred_b):  # one run against several seeds: pair it with each
        if 1 not in (len(pred_a), len(pred_b)):
            raise ValueError(f"cannot pair {len(pred_a)} seeds with {len(pred_b)}; give both run sets the same "
                             "seeds, or one of them a single run.")
        pred_a, pred_b = np.broadcast_arrays(pred_a, pred_b)
    boot = paired_bootstrap(y_true, pred_a, pred_b, class_names, N_RESAMPLES, seed)
    return {"macro_f1": boot["macro_f1"]["difference"],
            "ci95": [boot["macro_f1"]["ci95_low"], boot["macro_f1"]["ci95_high"]],
            "mcnemar_p": mcnemar_exact(y_true, pred_a, pred_b)["p_value"],
            "accuracy": boot["accuracy"]["difference"]}


METRIC_LABELS = {"macro_f1": "macro-F1", "accuracy": "accuracy"}


def verdict(label: str, d: dict, alpha: float = 0.05, metric: str = "macro_f1") -> str:
    """One line, e.g. "SigLIP - CLIP macro-F1 = +0.026 [+0.004, +0.048], McNemar p = 0.03: significant at 5%".

    `d`: {metric: the difference named by `label`, "ci95": its [lo, hi], "mcnemar_p": p}. Significant when
    the CI excludes 0 and McNemar rejects; "mixed" when only one of the two does."""
    lo, hi = d["ci95"]
    excludes_zero = lo > 0 or hi < 0
    significant = excludes_zero and d["mcnemar_p"] < alpha
    judgement = (f"significant at {alpha:.0%}" if significant else
                 f"not significant at {alpha:.0%}" if not excludes_zero and d["mcnemar_p"] >= alpha else
                 f"mixed at {alpha:.0%} (the CI {'excludes' if excludes_zero else 'includes'} 0, McNemar p "
                 f"{'<' if d['mcnemar_p'] < alpha else '>='} {alpha:g})")
    return (f"{label} {METRIC_LABELS[metric]} = {d[metric]:+.3f} [{lo:+.3f}, {hi:+.3f}], McNemar p = {d['mcnemar_p']:.2g}: "
            f"{judgement}")
