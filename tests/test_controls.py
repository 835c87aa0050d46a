"""The harness's controls, on the demo's shipped pretrained tiny checkpoints and a small synthetic world.

- A 0-epoch fine-tune is the starting weights evaluated as a run: its predictions equal zero-shot
  `evaluate`'s byte for byte, on the test split and on the shifted test split.
- A fine-tune on shuffled labels (each training image given a random class) must end below zero-shot
  by more than zero-shot's 95% bootstrap CI: if it did not, the harness could not see a difference.
- --val-fraction holds a validation part of train out of training, the same images for every seed.
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from har_ref.__main__ import main
from har_ref.data.folders import build_splits, hold_out
from har_ref.demo.tiny import CHECKPOINTS
from har_ref.demo.synthetic import generate
from har_ref.eval.metrics import bootstrap_ci
from har_ref.eval.run_results import load_run
from weights_conversion.hf import convert_hf

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small world with its shifted split (synthetic.py: held-out walls, palette and ink outlines)."""
    root = tmp_path_factory.mktemp("world")
    generate(root / "data", train_per_class=6, test_per_class=8, shift_per_class=4, image_size=64, seed=3,
             variation=0.0)
    return root / "data"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    return {family: convert_hf(CHECKPOINTS / family, root / family) for family in ("clip", "siglip")}


def train_args(family, weights, data, out, *extra):
    return ["train", "--model", family, "--weights", str(weights[family]), "--data", str(data), "--out", str(out),
            "--precision", "fp32", "--workers", "0", "--micro-batch", "30", "--accum-steps", "1",
            "--xbm-size", "0", "--checkpoint-minutes", "0", *extra]


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_zero_epochs_equals_zero_shot_exactly(family, world, weights, tmp_path):
    assert main(["evaluate", "--weights", str(weights[family]), "--data", str(world),
                 "--out", str(tmp_path / "zero_shot")]) == 0
    assert main(train_args(family, weights, world, tmp_path / "run", "--epochs", "0")) == 0
    for name in ("predictions.csv", "predictions_shift.csv"):
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "zero_shot" / name).read_bytes(), name
    shift = json.loads((tmp_path / "run" / "metrics_shift.json").read_text())
    assert shift["split"] == "test_shift" and shift["num_samples"] == 15 * 4


def test_shuffled_labels_fall_below_zero_shot_by_more_than_the_ci(world, weights, tmp_path, measured):
    """Measured (AMD EPYC, fp32): zero-shot macro-F1 0.909 [0.889, 0.923], shuffled-label fine-tune 0.365."""
    assert main(["evaluate", "--weights", str(weights["clip"]), "--data", str(world),
                 "--out", str(tmp_path / "zero_shot")]) == 0
    assert main(train_args("clip", weights, world, tmp_path / "shuffled", "--epochs", "3", "--lr", "1e-3",
                           "--warmup-steps", "0", "--shuffle-labels")) == 0
    zero = load_run(tmp_path / "zero_shot")
    index = {name: k for k, name in enumerate(zero.class_names)}
    y_true, y_pred = ([index[c] for c in column] for column in (zero.true, zero.pred))
    ci = bootstrap_ci(y_true, y_pred, zero.class_names, n_resamples=2000)["macro_f1"]
    tuned = json.loads((tmp_path / "shuffled" / "metrics.json").read_text())["macro_f1"]
    measured(f"shuffled-label control: fine-tuned macro-F1 {tuned:.3f}, zero-shot {ci['value']:.3f} "
             f"[{ci['ci95'][0]:.3f}, {ci['ci95'][1]:.3f}]")
    assert tuned < ci["ci95"][0], (tuned, ci)


def test_shuffle_labels_is_seeded_and_changes_the_labels(world, weights, tmp_path):
    from har_ref.data.folders import random_labels

    items, _, names = build_splits(world)
    a, b = random_labels(items, len(names), 0), random_labels(items, len(names), 1)
    assert a == random_labels(items, len(names), 0) and a != b
    assert [p for p, _ in a] == [p for p, _ in items]
    agree = np.mean([x[1] == y[1] for x, y in zip(a, items)])
    assert agree < 0.3  # 1/15 expected


def test_validation_part_is_held_out_and_the_same_for_every_seed(world, weights, tmp_path):
    items, _, names = build_splits(world)
    kept, held = hold_out(items, 0.2)
    assert sorted(kept + held) == sorted(items) and not set(kept) & set(held)
    per_class = np.bincount([c for _, c in held], minlength=len(names))
    assert per_class.min() >= 1 and per_class.sum() == sum(round(0.2 * 6) for _ in names)
    for seed in ("0", "1"):
        out = tmp_path / f"seed{seed}"
        assert main(train_args("clip", weights, world, out, "--epochs", "0", "--val-fraction", "0.2",
                               "--seed", seed)) == 0
        with open(out / "validation.csv", newline="") as f:
            rows = [(r["path"], names.index(r["class"])) for r in csv.DictReader(f)]
        assert rows == held
