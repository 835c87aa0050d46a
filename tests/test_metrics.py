"""har_ref.eval.metrics against scikit-learn / scipy and hand-computed values."""
import json

import numpy as np
import pytest
from scipy.special import softmax as scipy_softmax
from scipy.stats import binomtest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
)

from har_ref.eval import metrics
from har_ref.eval.metrics import (
    compute_metrics,
    expected_calibration_error,
    mcnemar_exact,
    paired_bootstrap,
    reliability_diagram_data,
    softmax,
)


def random_label_sets(count: int):
    """(y_true, y_pred, K) cases, many with classes missing from the truth or from the predictions."""
    rng = np.random.default_rng(1234)
    for case in range(count):
        k = int(rng.integers(1, 16))
        n = int(rng.integers(1, 200))
        y_true = rng.integers(0, k, n)
        y_pred = np.where(rng.random(n) < rng.random(), y_true, rng.integers(0, k, n))
        if case % 3 == 1 and k > 2:  # some classes never predicted
            y_pred = np.minimum(y_pred, k // 2)
        if case % 3 == 2 and k > 2:  # some classes have no support (and are still predicted)
            y_true = np.minimum(y_true, k // 2)
        yield y_true, y_pred, k


@pytest.mark.filterwarnings("ignore:A single label was found")
@pytest.mark.parametrize("y_true,y_pred,k", list(random_label_sets(120)))
def test_compute_metrics_equals_sklearn(y_true, y_pred, k):
    names = [f"class_{i}" for i in range(k)]
    labels = list(range(k))
    out = compute_metrics(y_true, y_pred, names)

    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for i, name in enumerate(names):
        assert out["per_class"][name]["precision"] == pytest.approx(p[i], abs=1e-15)
        assert out["per_class"][name]["recall"] == pytest.approx(r[i], abs=1e-15)
        assert out["per_class"][name]["f1"] == pytest.approx(f[i], abs=1e-15)
        assert out["per_class"][name]["support"] == s[i]
    kw = dict(labels=labels, average="macro", zero_division=0)
    assert out["macro_precision"] == pytest.approx(precision_score(y_true, y_pred, **kw), abs=1e-15)
    assert out["macro_recall"] == pytest.approx(recall_score(y_true, y_pred, **kw), abs=1e-15)
    assert out["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, **kw), abs=1e-15)
    assert out["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-15)
    assert out["confusion"] == confusion_matrix(y_true, y_pred, labels=labels).tolist()
    expected_norm = confusion_matrix(y_true, y_pred, labels=labels, normalize="true")
    np.testing.assert_allclose(out["confusion_normalized"], expected_norm, atol=1e-15)
    rows = np.asarray(out["confusion_normalized"]).sum(axis=1)
    support = np.bincount(y_true, minlength=k)
    np.testing.assert_allclose(rows, np.where(support > 0, 1.0, 0.0), atol=1e-12)


def test_compute_metrics_is_json_ready_and_named():
    names = ["calling", "clapping", "using_laptop"]
    out = compute_metrics(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 1]), names)
    assert json.loads(json.dumps(out)) == out  # plain python types only, no NaN
    assert list(out["per_class"]) == names
    assert out["accuracy"] == 0.5 and out["num_samples"] == 4


@pytest.mark.parametrize(
    "y_true,y_pred",
    [([0, 1, 3], [0, 1, 1]), ([0, 1], [0, -1]), ([0.0, 1.0], [0, 1]), ([0, 1], [0]), ([], [])],
)
def test_compute_metrics_rejects_bad_labels(y_true, y_pred):
    with pytest.raises(ValueError):
        compute_metrics(np.array(y_true), np.array(y_pred), ["a", "b", "c"])


# ---------------------------------------------------------------------------- calibration


def test_softmax_is_stable_and_matches_scipy():
    logits = np.array([[1000.0, 1001.0, 999.0], [-5.0, 0.0, 5.0], [0.0, 0.0, 0.0]])
    out = softmax(logits)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, scipy_softmax(logits, axis=-1), rtol=1e-13)
    np.testing.assert_allclose(out.sum(axis=1), 1.0)


def test_ece_hand_computed():
    probs = np.array(
        [
            [0.9, 0.05, 0.05],  # conf 0.90, correct  -> bin (0.5, 1]
            [0.8, 0.1, 0.1],  # conf 0.80, wrong    -> bin (0.5, 1]
            [0.4, 0.3, 0.3],  # conf 0.40, correct  -> bin [0, 0.5]
            [0.2, 0.35, 0.45],  # conf 0.45, wrong  -> bin [0, 0.5]
        ]
    )
    y = np.array([0, 1, 0, 0])
    # bin 0: acc 0.5, conf 0.425; bin 1: acc 0.5, conf 0.85
    expected = 0.5 * abs(0.5 - 0.425) + 0.5 * abs(0.5 - 0.85)
    assert expected_calibration_error(probs, y, n_bins=2) == pytest.approx(expected, abs=1e-15)
    data = reliability_diagram_data(probs, y, n_bins=2)
    assert data["bin_edges"] == [0.0, 0.5, 1.0]
    assert data["count"] == [2, 2]
    assert data["accuracy"] == [0.5, 0.5]
    assert data["confidence"] == pytest.approx([0.425, 0.85])
    assert data["ece"] == pytest.approx(expected, abs=1e-15)


def test_ece_bins_are_right_closed_and_perfect_calibration_is_zero():
    # conf exactly 0.5 belongs to (0, 0.5] (Guo et al.: ((m-1)/M, m/M]).
    data = reliability_diagram_data(np.array([[0.5, 0.25, 0.25]]), np.array([0]), n_bins=2)
    assert data["count"] == [1, 0]
    assert expected_calibration_error(np.eye(3), np.arange(3)) == 0.0


def test_ece_equals_loop_over_bins():
    rng = np.random.default_rng(0)
    probs = softmax(rng.normal(scale=3.0, size=(500, 15)))
    y = rng.integers(0, 15, 500)
    conf, correct = probs.max(1), probs.argmax(1) == y
    edges = np.linspace(0, 1, 16)
    expected = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            expected += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    assert expected_calibration_error(probs, y) == pytest.approx(expected, abs=1e-12)
    assert sum(reliability_diagram_data(probs, y)["count"]) == 500


# ---------------------------------------------------------------------------- paired bootstrap


def noisy_predictions(rng, y_true, k, accuracy):
    return np.where(rng.random(y_true.size) < accuracy, y_true, rng.integers(0, k, y_true.size))


def test_paired_bootstrap_equals_naive_loop_with_sklearn(monkeypatch):
    monkeypatch.setattr(metrics, "_BOOTSTRAP_CHUNK", 64)  # make the 150 resamples span 3 chunks
    rng = np.random.default_rng(7)
    k, n, resamples, seed = 5, 40, 150, 3
    y = rng.integers(0, k, n)
    a, b = noisy_predictions(rng, y, k, 0.5), noisy_predictions(rng, y, k, 0.7)
    out = paired_bootstrap(y, a, b, list("abcde"), n_resamples=resamples, seed=seed)

    idx_all = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    f1 = lambda t, p: f1_score(t, p, labels=range(k), average="macro", zero_division=0)
    f1_diffs = np.array([f1(y[i], b[i]) - f1(y[i], a[i]) for i in idx_all])
    acc_diffs = np.array([accuracy_score(y[i], b[i]) - accuracy_score(y[i], a[i]) for i in idx_all])
    for key, diffs, observed in (
        ("macro_f1", f1_diffs, f1(y, b) - f1(y, a)),
        ("accuracy", acc_diffs, accuracy_score(y, b) - accuracy_score(y, a)),
    ):
        assert out[key]["difference"] == pytest.approx(observed, abs=1e-12)
        assert out[key]["ci95_low"] == pytest.approx(np.percentile(diffs, 2.5), abs=1e-12)
        assert out[key]["ci95_high"] == pytest.approx(np.percentile(diffs, 97.5), abs=1e-12)
        assert out[key]["fraction_difference_le_0"] == np.mean(diffs <= 0)
    assert out["direction"] == "b - a" and out["n_resamples"] == resamples


def test_paired_bootstrap_deterministic_direction_and_fast():
    import time

    rng = np.random.default_rng(0)
    names = [str(i) for i in range(15)]
    y = np.repeat(np.arange(15), 126)  # the study's test set: 15 x 126 = 1890 images
    a, b = noisy_predictions(rng, y, 15, 0.78), noisy_predictions(rng, y, 15, 0.83)
    start = time.process_time()  # CPU time: other jobs on a shared machine do not count
    first = paired_bootstrap(y, a, b, names, seed=11)
    elapsed = time.process_time() - start
    assert elapsed < 5.0, f"10,000 resamples took {elapsed:.1f} s of CPU"
    assert paired_bootstrap(y, a, b, names, n_resamples=500, seed=11) == paired_bootstrap(
        y, a, b, names, n_resamples=500, seed=11
    )
    assert paired_bootstrap(y, a, b, names, n_resamples=500, seed=12) != paired_bootstrap(
        y, a, b, names, n_resamples=500, seed=11
    )
    assert first["macro_f1"]["difference"] > 0  # b is the better model
    flipped = paired_bootstrap(y, b, a, names, n_resamples=500, seed=11)
    assert flipped["accuracy"]["difference"] == pytest.approx(-first["accuracy"]["difference"])
    for key in ("macro_f1", "accuracy"):
        s = first[key]
        assert s["ci95_low"] < s["difference"] < s["ci95_high"]
        assert 0.0 <= s["fraction_difference_le_0"] < 0.05  # a 5-point gap on 1890 images is clear


def test_paired_bootstrap_identical_models_give_zero_difference():
    y = np.arange(10) % 3
    p = np.array([0, 1, 1, 0, 1, 2, 0, 0, 2, 1])
    out = paired_bootstrap(y, p, p, ["x", "y", "z"], n_resamples=300)
    for key in ("macro_f1", "accuracy"):
        assert out[key]["difference"] == out[key]["ci95_low"] == out[key]["ci95_high"] == 0.0
        assert out[key]["fraction_difference_le_0"] == 1.0


# ---------------------------------------------------------------------------- McNemar


def predictions_with_discordance(b: int, c: int, both_right: int = 5, both_wrong: int = 3):
    """Labels where a-right/b-wrong happens b times and a-wrong/b-right c times."""
    n = b + c + both_right + both_wrong
    y = np.zeros(n, dtype=int)
    a_right = np.r_[np.ones(b), np.zeros(c), np.ones(both_right), np.zeros(both_wrong)].astype(bool)
    b_right = np.r_[np.zeros(b), np.ones(c), np.ones(both_right), np.zeros(both_wrong)].astype(bool)
    return y, np.where(a_right, 0, 1), np.where(b_right, 0, 2)


@pytest.mark.parametrize("b,c,p", [(1, 6, 0.125), (6, 1, 0.125), (5, 5, 1.0), (0, 0, 1.0), (0, 3, 0.25)])
def test_mcnemar_hand_computed(b, c, p):
    out = mcnemar_exact(*predictions_with_discordance(b, c))
    assert (out["b"], out["c"], out["n_discordant"]) == (b, c, b + c)
    assert out["p_value"] == p


@pytest.mark.parametrize("b,c", [(2, 9), (40, 61), (130, 170), (900, 1000), (950, 1050), (10, 1900)])
def test_mcnemar_matches_scipy_binomtest(b, c):
    out = mcnemar_exact(*predictions_with_discordance(b, c))
    expected = binomtest(min(b, c), b + c, 0.5).pvalue
    assert out["p_value"] == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert 0.0 <= out["p_value"] <= 1.0
