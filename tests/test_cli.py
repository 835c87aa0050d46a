"""The command line: every subcommand on tiny inputs, and one-line errors with exit status 2."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from PIL import Image

from flat_layout import write_flat_csv_layout


def cli(*args, ok=True):
    done = subprocess.run([sys.executable, "-m", "har_ref", *map(str, args)], capture_output=True, text=True)
    assert (done.returncode == 0) == ok, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    return done


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    cli("synth", "--out", root, "--train-per-class", 3, "--test-per-class", 2)
    return root


@pytest.fixture(scope="module")
def weights(tiny_weights):
    return tiny_weights["siglip"]


def read_predictions(run) -> dict[str, dict]:
    with open(run / "predictions.csv", encoding="utf-8") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def test_prepare_reports_problems(tmp_path):
    csv_path, images = write_flat_csv_layout(tmp_path / "flat", per_class=4, image_size=32)
    with open(csv_path, "a") as f:
        f.write("missing_image.png,calling\n")
    done = cli("prepare", "--csv", csv_path, "--images", images, "--out", tmp_path / "data", "--test-per-class", 1)
    assert "missing_files: 1" in done.stdout
    assert len(list((tmp_path / "data" / "test" / "calling").iterdir())) == 1
    assert len(list((tmp_path / "data" / "train" / "calling").iterdir())) == 3


def test_evaluate_and_predict(data, weights, tmp_path):
    done = cli("evaluate", "--weights", weights, "--data", data, "--out", tmp_path / "eval")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert f"accuracy {metrics['accuracy']:.4f}" in done.stdout and metrics["num_samples"] == 30
    image = sorted((data / "test" / "texting").iterdir())[0]
    done = cli("predict", image, "--weights", weights, "--classes", data, "--true", "texting",
               "--panel", tmp_path / "panel.png")
    ranked = next(line for line in done.stdout.splitlines() if line.startswith(f"  {image}: "))
    top1 = ranked.split(": ", 1)[1].split(",")[0].rsplit(" ", 1)[0]
    assert top1 == read_predictions(tmp_path / "eval")[str(image)]["pred"]  # predict agrees with evaluate
    with Image.open(tmp_path / "panel.png") as panel:
        assert panel.format == "PNG"


def test_compare_two_evaluations(data, tiny_weights, tmp_path):
    """The report's overall numbers and paired counts are those of the two runs' predictions.csv
    (recomputed here with scikit-learn): CLIP and SigLIP, which predict differently."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    for family in ("clip", "siglip"):
        cli("evaluate", "--weights", tiny_weights[family], "--data", data, "--out", tmp_path / family)
    cli("compare", tmp_path / "clip", tmp_path / "siglip", "--out", tmp_path / "report", "--resamples", 200)
    md = (tmp_path / "report" / "report.md").read_text()
    names = json.loads((tmp_path / "report" / "comparison.json").read_text())["models"]
    a, b = read_predictions(tmp_path / "clip"), read_predictions(tmp_path / "siglip")
    assert a.keys() == b.keys() and len(a) == 30
    paths = sorted(a)
    truth = [a[p]["true"] for p in paths]
    preds = {"a": [a[p]["pred"] for p in paths], "b": [b[p]["pred"] for p in paths]}
    assert preds["a"] != preds["b"]  # the comparison has something to show
    accuracy = {}
    for key, pred in preds.items():
        precision, recall, f1, _ = precision_recall_fscore_support(truth, pred, labels=sorted(set(truth)),
                                                                   average="macro", zero_division=0)
        accuracy[key] = accuracy_score(truth, pred)
        assert f"| {names[key]} | {precision:.3f} | {recall:.3f} | {f1:.3f} | {accuracy[key]:.3f} |" in md
    assert f"| Accuracy | {accuracy['a'] - accuracy['b']:+.3f} |" in md  # A - B
    only_a = sum(x == t != y for x, y, t in zip(preds["a"], preds["b"], truth))
    only_b = sum(y == t != x for x, y, t in zip(preds["a"], preds["b"], truth))
    assert f"{names['a']} right and {names['b']} wrong on {only_a} images, {names['a']} wrong and " \
           f"{names['b']} right on {only_b}" in md


@pytest.mark.parametrize("args, message", [
    (("evaluate", "--weights", "/nonexistent", "--data", "/nonexistent", "--out", "/tmp/x"), "config.json"),
    (("synth", "--out", "/tmp/x", "--train-per-class", "0"), "at least 1 train"),
])
def test_user_errors_are_one_line(args, message):
    done = cli(*args, ok=False)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_train_help_shows_each_presets_value():
    done = cli("train", "--help")
    text = " ".join(done.stdout.split())  # argparse wraps lines
    assert "--accum-steps ACCUM_STEPS (clip: 32, siglip: 500)" in text
    assert "--xbm-size XBM_SIZE (clip: 4096, siglip: 32000)" in text
    assert "--lr LR (clip and siglip: 1e-05)" in text
