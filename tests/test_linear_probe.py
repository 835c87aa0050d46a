"""eval/linear_probe.py: the solver against scikit-learn's LogisticRegression, its stationarity, and the
`linear-probe` command end to end on a small image folder.

The synthetic set: 15 classes, Gaussian clusters in 32 dimensions around random centres, L2-normalized
as the embeddings are, overlapping (test accuracy 0.54-0.64 over the Cs tested), so that many test
points lie near a decision boundary.
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression

from har_ref.__main__ import main
from har_ref.data.folders import build_splits, hold_out
from har_ref.eval.linear_probe import C_GRID, ProbeData, fit_probe
from har_ref.eval.run_results import load_run

pytestmark = pytest.mark.usefixtures("one_thread")

K, DIM = 15, 32
CLASSES = ("arm wrestling", "café dancing", "high-jump")  # a space, an accent, a hyphen


def clusters(n_per_class: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Unit vectors around 15 fixed centres (the same for every seed); the noise drawn with `seed`."""
    centres = np.random.default_rng(0).normal(size=(K, DIM))
    noise = np.random.default_rng(seed).normal(size=(K, n_per_class, DIM))
    x = (centres[:, None] + 2.5 * noise).reshape(-1, DIM)
    return torch.tensor(x / np.linalg.norm(x, axis=1, keepdims=True)), np.repeat(np.arange(K), n_per_class)


def sklearn_objective(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: np.ndarray, C: float) -> torch.Tensor:
    """The specification, written out apart from the code under test: sum_i -log softmax(W x_i + b)[y_i]
    + ||W||^2 / (2C), b not penalized (scikit-learn's LogisticRegression, multinomial)."""
    logits = x @ W.T + b
    return (logits.logsumexp(1) - logits[torch.arange(len(y)), torch.as_tensor(y)]).sum() + (W * W).sum() / (2 * C)


@pytest.fixture(scope="module")
def fitted():
    """{C: (ours (W, b), sklearn's (W, b))} on 40 points per class, and 100 test points per class."""
    x, y = clusters(40, seed=1)
    data = ProbeData.of(x, y, K)
    fits = {}
    for C in (0.1, 1.0, 10.0, 100.0, 1000.0):
        W, b, _ = fit_probe(data, C)
        sk = LogisticRegression(C=C, solver="lbfgs", max_iter=100_000, tol=1e-12).fit(x.numpy(), y)
        fits[C] = (W, b), (torch.tensor(sk.coef_), torch.tensor(sk.intercept_))
    return x, y, clusters(100, seed=2), fits


@pytest.mark.parametrize("C", [0.1, 1.0, 10.0, 100.0, 1000.0])
def test_agrees_with_sklearn_logistic_regression(fitted, C, measured):
    x, y, (x_test, y_test), fits = fitted
    (W, b), (W_sk, b_sk) = fits[C]
    ours, theirs = (x_test @ W.T + b).argmax(1).numpy(), (x_test @ W_sk.T + b_sk).argmax(1).numpy()
    agreement = (ours == theirs).mean()
    f, f_sk = sklearn_objective(W, b, x, y, C).item(), sklearn_objective(W_sk, b_sk, x, y, C).item()
    # the softmax is unchanged by adding a constant to every class's bias: compare centred biases
    coef_diff = max((W - W_sk).abs().max().item(), ((b - b.mean()) - (b_sk - b_sk.mean())).abs().max().item())
    coef_diff /= max(W_sk.abs().max().item(), b_sk.abs().max().item())  # relative to the largest coefficient
    measured(f"linear probe vs sklearn, C={C:g}: test agreement {agreement:.4f}, objective {f:.10g} vs {f_sk:.10g} "
             f"(relative {(f - f_sk) / f_sk:+.1e}), max |coef diff| / max |coef| {coef_diff:.1e}, test accuracy "
             f"{(ours == y_test).mean():.3f}")
    assert agreement >= 0.99  # measured 1.0 at every C
    assert f <= f_sk * (1 + 1e-6)  # measured: at most 6.5e-10 above (C = 1000), 4e-15 at C = 0.1
    assert coef_diff < 3e-4  # measured at most 1.2e-4 (C = 1000: the flattest problem), 3.4e-7 at C = 0.1


@pytest.mark.parametrize("C", [0.1, 1.0, 10.0, 100.0, 1000.0])
def test_gradient_vanishes_at_the_solution(fitted, C, measured):
    x, y, _, fits = fitted
    (W, b), _ = fits[C]
    W, b = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
    sklearn_objective(W, b, x, y, C).backward()
    grad = max(W.grad.abs().max().item(), b.grad.abs().max().item())
    measured(f"linear probe, C={C:g}: max |df/d(W, b)| at the solution {grad:.1e} (f summed over {len(x)} images)")
    assert grad < 1e-4  # measured at most 6.0e-5 (L-BFGS stops at max |grad of f / N| < GRAD_TOL = 1e-7)


def write_image_folders(root, per_split=(("train", 8), ("test", 4), ("test_shift", 3))):
    """DATA/<split>/<class>/ of noise images whose colour depends on the class (the shifted split darker),
    with an odd-size image and an undecodable file in train, as users' folders have."""
    rng = np.random.default_rng(0)
    for split, count in per_split:
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(count):
                mean = (60 + 70 * c, 200 - 70 * c, 90) if split != "test_shift" else (40 + 60 * c, 160 - 60 * c, 60)
                pixels = np.clip(rng.normal(mean, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img {k}.png")
    odd = np.clip(rng.normal((60, 200, 90), 30, (23, 61, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(odd).save(root / "train" / CLASSES[0] / "odd size.jpg")
    (root / "train" / CLASSES[1] / "broken.jpg").write_text("not an image")
    return root


def test_command_writes_a_run_that_compare_reads(tiny_weights, tmp_path, capsys):
    data, out = write_image_folders(tmp_path / "data"), tmp_path / "probe"
    broken = data / "train" / CLASSES[1] / "broken.jpg"
    assert main(["linear-probe", "--weights", str(tiny_weights["clip"]), "--data", str(data), "--out", str(out),
                 "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    run, shift = load_run(out), load_run(out, suffix="_shift")
    metrics = json.loads((out / "metrics.json").read_text())
    probe = metrics["linear_probe"]
    assert run.name == "CLIP linear probe" and run.family == "clip" and run.class_names == list(CLASSES)
    assert len(run.paths) == 12 and len(shift.paths) == 9 and metrics["split"] == "test"
    assert probe["C"] in C_GRID and [r["C"] for r in probe["grid"]] == sorted(C_GRID)
    best = max(r["val_macro_f1"] for r in probe["grid"])  # chosen: best score, then lowest cross-entropy
    assert probe["C"] == min((r for r in probe["grid"] if r["val_macro_f1"] == best),
                             key=lambda r: r["val_cross_entropy"])["C"]
    # 3 x 8 images + the odd-size one (the broken file skipped); the validation part is the one
    # `train --val-fraction 0.2` would hold out with this seed, less unreadable files
    held = {path for path, _ in hold_out(build_splits(data)[0], 0.2, seed=1)[1]} - {str(broken)}
    assert probe["train_images"] == 25 and probe["val_images"] == len(held) and probe["seed"] == 1
    assert f"C={probe['C']:g}" in printed
    assert "broken.jpg" in (out / "skipped.txt").read_text()
    assert [run.class_names[i] for i in run.scores.argmax(1)] == run.pred
    assert metrics["accuracy"] == 1.0  # measured: the classes' colours are far apart on test and shift
    with open(out / "predictions_shift.csv", newline="", encoding="utf-8") as f:
        assert next(csv.reader(f))[:3] == ["path", "true", "pred"]


def test_bad_validation_fraction_is_one_line(tiny_weights, tmp_path, capsys):
    data = write_image_folders(tmp_path / "data", per_split=(("train", 2), ("test", 1)))
    assert main(["linear-probe", "--weights", str(tiny_weights["clip"]), "--data", str(data),
                 "--out", str(tmp_path / "probe"), "--val-fraction", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--val-fraction" in err[0]
