"""The command line: every subcommand on tiny inputs, and one-line errors with exit status 2."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from flat_layout import write_flat_csv_layout
from har_ref.data.prompts import PromptBank
from har_ref.demo.synthetic import CLASS_NAMES
from tiny_checkpoint import make_tiny_checkpoint


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
def weights(tmp_path_factory):
    torch.manual_seed(0)
    texts, _ = PromptBank.from_file(None, list(CLASS_NAMES)).all_prompts()
    return make_tiny_checkpoint("siglip", texts, tmp_path_factory.mktemp("w"), seed=0)


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
    assert "SigLIP" in done.stdout and (tmp_path / "panel.png").is_file()


def test_compare_two_evaluations(data, weights, tmp_path):
    for name in ("a", "b"):
        cli("evaluate", "--weights", weights, "--data", data, "--out", tmp_path / name)
    cli("compare", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "report", "--resamples", 200)
    assert "Macro F1" in (tmp_path / "report" / "report.md").read_text()


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
