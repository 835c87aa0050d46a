"""The report's section "What each model looks at" (eval/report_maps.py, eval/embedding_map.py).

The pieces are checked against answers worked out here: the PCA plane against numpy's SVD of the stacked
embeddings, the drawn panels against one shared scale, the confused pairs against a hand-made confusion
matrix, the pointing-game means against a hand-made map and boxes. Then the whole section on a small
synthetic world: the shipped tiny checkpoints converted as a user converts theirs, `train --epochs 0`
runs, and compare_runs with the explain inputs.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from har_ref import load_model
from har_ref.__main__ import main
from har_ref.demo.synthetic import generate
from har_ref.demo.tiny import CHECKPOINTS
from har_ref.eval.embedding_map import Panel, class_colour, pca_2d, plot_embedding_map, project
from har_ref.eval.explain import attention_map, pointing_game
from har_ref.eval.report import compare_runs
from har_ref.eval.report_maps import (ExplainInputs, Scan, Weights, confused_pairs, pair_images,
                                      pointing_numbers)
from har_ref.model.transforms import build_transform, load_image
from weights_conversion.hf import convert_hf

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ("clip", "siglip")


def test_pca_projection_equals_numpy_svd_of_the_stacked_embeddings():
    rng = np.random.default_rng(0)
    sets = [rng.normal(size=(40, 16)) + 2.0, rng.normal(size=(30, 16)) * 0.5]  # zero-shot-like and fine-tuned-like
    sets = [s / np.linalg.norm(s, axis=1, keepdims=True) for s in sets]
    mean, components, variance = pca_2d(sets)
    stacked = np.concatenate(sets)
    u, s, vt = np.linalg.svd(stacked - stacked.mean(0), full_matrices=False)
    ours = project(stacked, mean, components)
    for k in range(2):  # an SVD's sign is arbitrary: numpy's column k, up to its sign
        sign = np.sign(ours[:, k] @ (u[:, k] * s[k]))
        assert np.abs(ours[:, k] - sign * u[:, k] * s[k]).max() < 1e-13  # measured 5.4e-15
        assert np.abs(components[k]).argmax() == np.argmax(components[k])  # the largest entry is positive
    assert np.allclose(variance, s[:2] ** 2 / (s ** 2).sum(), rtol=0, atol=1e-15)
    # each set projects with the stacked set's mean and components: the panels share coordinates
    assert np.abs(project(sets[1], mean, components) - ours[40:]).max() == 0


def _diamond_centres(picture: np.ndarray, colour) -> list[tuple[float, float]]:
    """Centres of the pixels of one colour, in the left and the right half of the picture."""
    ys, xs = np.nonzero(np.all(picture == colour, axis=-1))
    half = picture.shape[1] / 2
    return [(xs[side].mean(), ys[side].mean()) for side in (xs < half, xs >= half)]


def test_embedding_map_panels_share_one_scale(tmp_path):
    """Two panels whose image clouds differ threefold in extent; their class texts sit at the same two
    points. On one scale the two diamonds are the same number of pixels apart in both panels."""
    rng = np.random.default_rng(1)
    texts = np.array([[0.3, 0.3], [-0.3, -0.2]])
    panels = [Panel(f"panel {i}", rng.uniform(-spread, spread, (200, 2)), np.full(200, 2), texts,
                    np.array([0.4, 0.2])) for i, spread in enumerate((0.3, 0.9))]
    picture = np.asarray(plot_embedding_map([panels], ["a", "b", "c"], tmp_path / "map.png", "two panels"))
    picture = picture[:-100]  # the class legend's one row below the panels has swatches of these colours too
    (a_left, a_right), (b_left, b_right) = (_diamond_centres(picture, class_colour(k)) for k in (0, 1))
    left = np.subtract(b_left, a_left)
    right = np.subtract(b_right, a_right)
    assert np.abs(left - right).max() <= 0.5  # measured 0
    assert abs(left[0]) > 50  # the diamonds are apart (0.6 data units)
    assert abs(abs(left[0]) / abs(left[1]) - 0.6 / 0.5) < 0.05  # a unit of x is a unit of y


def test_confused_pairs_are_those_of_a_hand_made_confusion_matrix():
    c = np.zeros((5, 5), dtype=int)
    np.fill_diagonal(c, 20)
    c[0, 1], c[1, 0] = 3, 4  # 7
    c[1, 3], c[3, 1] = 2, 3  # 5
    c[4, 2] = 5  # 5, one way only; ties with (1, 3): class order decides
    c[0, 2] = 1  # 1: the fourth pair
    assert confused_pairs(c) == [(0, 1, 7), (1, 3, 5), (2, 4, 5)]
    assert confused_pairs(c, top=5) == [(0, 1, 7), (1, 3, 5), (2, 4, 5), (0, 2, 1)]  # never-confused pairs left out


def test_pair_images_take_the_confused_images_first_in_turn():
    true = np.array([0, 0, 0, 1, 1, 1, 2, 0])
    pred_a = np.array([1, 0, 0, 0, 1, 1, 0, 2])  # row 0: 0 -> 1; row 3: 1 -> 0
    pred_b = np.array([0, 1, 0, 1, 1, 0, 1, 0])  # row 1: 0 -> 1; row 5: 1 -> 0
    rows = pair_images(true, [pred_a, pred_b], 0, 1, 4, seed=0)
    assert sorted(rows[0::2]) == [0, 1] and sorted(rows[1::2]) == [3, 5]  # the two directions alternate
    more = pair_images(true, [pred_a, pred_b], 0, 1, 6, seed=0)
    assert more[:4] == rows and sorted(more[4:]) in ([2, 4], [2, 7], [4, 7])  # then the pair's other images
    assert 6 not in pair_images(true, [pred_a, pred_b], 0, 1, 8, seed=0)  # class 2 is not in the pair


def test_pointing_numbers_on_a_hand_made_map_and_boxes(tiny_weights, tmp_path):
    """SigLIP's 8x8 grid over 64x64 images: a patch is 8x8 pixels. Image 1's map puts half its mass on the
    patch (row 2, column 3) = pixels x 24-32, y 16-24, and half on patch (0, 0); image 2's map is uniform."""
    model = load_model(tiny_weights["siglip"])
    one = np.zeros((8, 8))
    one[2, 3] = one[0, 0] = 0.5
    uniform = np.full((8, 8), 1 / 64)
    boxes = {"test/a/0.png": {"person": [24, 16, 32, 24], "prop": [0, 0, 16, 8], "distractors": []},
             "test/b/0.png": {"person": [0, 0, 64, 64], "prop": None, "distractors": []}}
    paths = [str(tmp_path / p) for p in boxes] + [str(tmp_path / "test/c/0.png")]  # the third has no entry
    scan = Scan(paths, np.array([0, 1, 2]), [(64, 64)] * 3,
                maps=[np.stack([one, uniform, one]), np.stack([uniform, uniform, uniform])], embeddings=[])
    models = [[Weights("SigLIP", "zero-shot", Path("zs"), model, None, None),
               Weights("SigLIP", "fine-tuned, seed 0", Path("ft"), model, None, None)]]
    numbers = pointing_numbers(models, {"test": scan}, boxes, tmp_path)
    zero_shot, tuned = numbers["splits"]["test"]
    assert zero_shot["images_with_boxes"] == 2 and zero_shot["person"]["images"] == 2
    assert zero_shot["person"]["map"] == pytest.approx((0.5 + 1) / 2, abs=1e-12)
    assert zero_shot["person"]["uniform"] == pytest.approx((1 / 64 + 1) / 2, abs=1e-12)
    assert zero_shot["person"]["map_minus_uniform"] == pytest.approx((0.5 - 1 / 64) / 2, abs=1e-12)
    assert zero_shot["prop"] == pytest.approx({"map": 0.5, "uniform": 2 / 64, "map_minus_uniform": 0.5 - 2 / 64,
                                               "images": 1}, abs=1e-12)
    assert tuned["person"]["map"] == pytest.approx((1 / 64 + 1) / 2, abs=1e-12)  # the uniform map is chance
    assert tuned["person"]["map_minus_uniform"] == pytest.approx(0, abs=1e-12)
    shift = numbers["fine_tuned_minus_zero_shot"]["test"]["SigLIP"]
    assert shift == pytest.approx({"person": (1 / 64 + 1) / 2 - 0.75, "prop": 2 / 64 - 0.5}, abs=1e-12)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """A small world, the shipped tiny checkpoints converted, a `train --epochs 0` run per family, and the
    report with the explain inputs."""
    root = tmp_path_factory.mktemp("study")
    generate(root / "data", train_per_class=2, test_per_class=4, shift_per_class=2, seed=5)
    weights = {family: convert_hf(CHECKPOINTS / family, root / "weights" / family) for family in FAMILIES}
    for family in FAMILIES:
        assert main(["train", "--model", family, "--weights", str(weights[family]), "--data", str(root / "data"),
                     "--out", str(root / family / "seed0"), "--epochs", "0", "--seed", "0"]) == 0
    report = compare_runs(root / "clip" / "seed0", root / "siglip" / "seed0", root / "report", n_resamples=200,
                          explain=ExplainInputs(root / "data", weights))
    return root, weights, report


def test_compare_runs_with_explain_inputs_writes_the_pictures_and_the_section(tiny_study):
    root, weights, report = tiny_study
    text = report.read_text()
    section = text[text.index("## What each model looks at"):text.index("## Verdict")]
    assert "fine-tuned, seed 0" in section and str(weights["clip"]) in section
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", section)
    assert linked == ["looks_pair_1.png", "looks_pair_2.png", "looks_pair_3.png", "embedding_map.png"]
    for file in linked:
        with Image.open(root / "report" / file) as picture:
            assert picture.format == "PNG" and min(picture.size) > 400
    pointing = json.loads((root / "report" / "pointing_game.json").read_text())
    assert list(pointing["splits"]) == ["test", "test_shift"]
    table = [line for line in section.splitlines() if line.startswith("| test")]
    assert len(table) == 8  # 2 splits x 2 families x (zero-shot, fine-tuned)
    for line, row in zip(table, [r for rows in pointing["splits"].values() for r in rows]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:3] == [row["model"], row["stage"]]
        assert float(cells[3]) == pytest.approx(row["person"]["map"], abs=5e-4)
        assert float(cells[6]) == pytest.approx(row["prop"]["map"], abs=5e-4)
        assert row["person"]["images"] == (60 if cells[0] == "test" else 30)  # every image has a person box


def test_pointing_game_json_equals_the_maps_recomputed_image_by_image(tiny_study, measured):
    """The section reads each image once for every model (decoded once, resized once per input size);
    its numbers must be those of explain.py's attention_map through each model's own eval transform."""
    root, weights, _ = tiny_study
    pointing = json.loads((root / "report" / "pointing_game.json").read_text())
    boxes = json.loads((root / "data" / "boxes.json").read_text())
    paths = sorted((root / "data" / "test_shift").rglob("*.png"))
    for family, row in zip(FAMILIES, pointing["splits"]["test_shift"][1::2]):  # the fine-tuned rows
        model = load_model(root / family / "seed0")
        transform = build_transform(model.cfg)
        maps = attention_map(model, torch.stack([transform(load_image(p)) for p in paths]))
        found = [boxes[p.relative_to(root / "data").as_posix()] for p in paths]
        sizes = [load_image(p).size for p in paths]
        for part in ("person", "prop"):
            share, _ = pointing_game(maps, [b[part] for b in found], sizes, model.cfg)
            difference = abs(row[part]["map"] - np.nanmean(share))
            measured(f"report_maps: {family} {part} box share, section vs recomputed: {difference:.1e}")
            assert difference <= 1e-12  # measured 0: the same float32 maps, averaged in another order
