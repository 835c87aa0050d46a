"""Statistics over several seeds (har_ref/eval/metrics.py): each against a naive loop with scikit-learn.

With [S, N] predictions (row k = the run with seed k), a bootstrap resample draws N test images once and
scores every seed on that same draw; the statistic is the mean over seeds. McNemar pools the discordant
pairs of seed k of model a against seed k of model b.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from har_ref.eval import metrics
from har_ref.eval.metrics import bootstrap_ci, mcnemar_exact, paired_bootstrap

K, N, SEEDS = 5, 60, 3


def noisy(rng, y, accuracy):
    return np.where(rng.random(y.size) < accuracy, y, rng.integers(0, K, y.size))


def macro_f1(t, p):
    return f1_score(t, p, labels=range(K), average="macro", zero_division=0)


@pytest.fixture
def runs():
    rng = np.random.default_rng(5)
    y = rng.integers(0, K, N)
    a = np.stack([noisy(rng, y, 0.5) for _ in range(SEEDS)])
    b = np.stack([noisy(rng, y, 0.7) for _ in range(SEEDS)])
    return y, a, b


def test_seed_paired_bootstrap_is_the_mean_over_seed_pairs_on_one_draw(monkeypatch, runs):
    monkeypatch.setattr(metrics, "_BOOTSTRAP_CHUNK", 32)  # 100 resamples span 4 chunks
    y, a, b = runs
    resamples, seed = 100, 9
    out = paired_bootstrap(y, a, b, list("abcde"), n_resamples=resamples, seed=seed)

    draws = np.random.default_rng(seed).integers(0, N, size=(resamples, N))
    f1_diffs = np.array([np.mean([macro_f1(y[i], b[k][i]) - macro_f1(y[i], a[k][i]) for k in range(SEEDS)])
                         for i in draws])
    acc_diffs = np.array([np.mean([accuracy_score(y[i], b[k][i]) - accuracy_score(y[i], a[k][i])
                                   for k in range(SEEDS)]) for i in draws])
    observed_f1 = np.mean([macro_f1(y, b[k]) - macro_f1(y, a[k]) for k in range(SEEDS)])
    assert out["seeds"] == SEEDS
    assert out["macro_f1"]["difference"] == pytest.approx(observed_f1, abs=1e-12)
    for key, diffs in (("macro_f1", f1_diffs), ("accuracy", acc_diffs)):
        assert out[key]["ci95_low"] == pytest.approx(np.percentile(diffs, 2.5), abs=1e-12)
        assert out[key]["ci95_high"] == pytest.approx(np.percentile(diffs, 97.5), abs=1e-12)
        assert out[key]["fraction_difference_le_0"] == np.mean(diffs <= 0)


def test_one_seed_row_equals_the_one_dimensional_call(runs):
    y, a, b = runs
    assert paired_bootstrap(y, a[:1], b[:1], list("abcde"), 200, 1) == {
        **paired_bootstrap(y, a[0], b[0], list("abcde"), 200, 1), "seeds": 1}


def test_bootstrap_ci_of_one_model_over_seeds(runs):
    y, _, b = runs
    out = bootstrap_ci(y, b, list("abcde"), n_resamples=120, seed=4)
    draws = np.random.default_rng(4).integers(0, N, size=(120, N))
    f1s = np.array([np.mean([macro_f1(y[i], b[k][i]) for k in range(SEEDS)]) for i in draws])
    assert out["macro_f1"]["value"] == pytest.approx(np.mean([macro_f1(y, row) for row in b]), abs=1e-12)
    assert out["macro_f1"]["ci95"] == pytest.approx(list(np.percentile(f1s, [2.5, 97.5])), abs=1e-12)
    low, high = out["accuracy"]["ci95"]
    assert low < out["accuracy"]["value"] < high


def test_mcnemar_pools_discordant_pairs_over_seed_pairs(runs):
    y, a, b = runs
    pooled = mcnemar_exact(y, a, b)
    per_seed = [mcnemar_exact(y, a[k], b[k]) for k in range(SEEDS)]
    assert pooled["b"] == sum(r["b"] for r in per_seed) and pooled["c"] == sum(r["c"] for r in per_seed)
    n, low = pooled["n_discordant"], min(pooled["b"], pooled["c"])
    assert pooled["p_value"] == pytest.approx(min(1.0, 2 * sum(math.comb(n, i) for i in range(low + 1)) / 2 ** n),
                                              rel=1e-12)


def test_seed_rows_must_pair(runs):
    y, a, b = runs
    with pytest.raises(ValueError, match="pair seed by seed"):
        paired_bootstrap(y, a, b[:2], list("abcde"), 10)
    with pytest.raises(ValueError, match="same shape"):
        mcnemar_exact(y, a, b[:2])
