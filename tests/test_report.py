"""har_ref.eval.report: the numbers in report.md are the metrics functions' numbers on the aligned predictions,
every linked picture is a PNG on disk, and bad inputs fail with one clear error."""
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from har_ref.demo import synthetic
from har_ref.eval.evaluate import write_predictions
from har_ref.eval.metrics import (compute_metrics, expected_calibration_error, mcnemar_exact, paired_bootstrap,
                             softmax)
from har_ref.eval.drawing import display_name
from har_ref.eval.report import compare_runs, pick_examples

CLASSES = ["calling", "running", "texting", "using_laptop"]
PER_CLASS = 8
RESAMPLES = 300


@pytest.fixture(scope="module")
def test_images(tmp_path_factory):
    """DATA/test/<class>/NNNN.png: (path, class_id) items, drawn by the synthetic renderer."""
    root = tmp_path_factory.mktemp("data") / "test"
    items = []
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            path = root / name / f"{i:04d}.png"
            synthetic.render(name, np.random.default_rng([k, i]), image_size=32).save(path)
            items.append((str(path), k))
    return items


def fake_logits(items, seed: int, skill: float) -> np.ndarray:
    """Random logits, the true class boosted by `skill` (larger: more often right)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(items), len(CLASSES))) * 2
    logits[np.arange(len(items)), [c for _, c in items]] += skill
    return logits


def make_run(directory, items, logits, name, family, log=True, synthetic_flag=False, order=None):
    """A run directory as train/evaluate write it; `order` permutes the rows of predictions.csv."""
    directory.mkdir(parents=True)
    order = np.arange(len(items)) if order is None else order
    write_predictions(directory / "predictions.csv", items, order, logits[order], CLASSES)
    y = np.array([c for _, c in items])
    metrics = compute_metrics(y, logits.argmax(1), CLASSES)
    metrics.update(model_name=name, family=family, split="test", skipped_images=[])
    (directory / "metrics.json").write_text(json.dumps(metrics))
    (directory / "train_config.json").write_text(json.dumps({"model": family, "synthetic": synthetic_flag}))
    if log:
        base = 3.0 if family == "clip" else 15.0
        records = [{"epoch": e, "loss": base / e, "epoch_time_s": 10.0 + e + (5 if family == "siglip" else 0),
                    "images_per_s": 100.0, "lr": 1e-5, "logit_scale": 4.6, "logit_bias": None, "step": e}
                   for e in range(1, 6)]
        (directory / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


def rounded(logits):
    """The logits as predictions.csv stores them (6 significant digits)."""
    return np.vectorize(lambda x: float(f"{x:.6g}"))(logits)


def linked_pictures(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


@pytest.fixture(scope="module")
def two_runs(test_images, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    logits_a, logits_b = fake_logits(test_images, 22, 2.0), fake_logits(test_images, 2, 3.0)  # each wins a class
    shuffled = np.random.default_rng(3).permutation(len(test_images))  # B's rows in another order
    make_run(root / "clip", test_images, logits_a, "CLIP", "clip")
    make_run(root / "siglip", test_images, logits_b, "SigLIP", "siglip", order=shuffled)
    report = compare_runs(root / "clip", root / "siglip", root / "compare", n_resamples=RESAMPLES, seed=0)
    return report, logits_a, logits_b, test_images


def scored(two_runs):
    """(report text, true labels, each run's predictions, each run's metrics) of the two_runs fixture."""
    report, logits_a, logits_b, items = two_runs
    y = np.array([c for _, c in items])
    pred_a, pred_b = logits_a.argmax(1), logits_b.argmax(1)
    return (report.read_text(), y, pred_a, pred_b, compute_metrics(y, pred_a, CLASSES),
            compute_metrics(y, pred_b, CLASSES))


def test_report_numbers_equal_metrics_functions(two_runs):
    report, logits_a, logits_b, items = two_runs
    md, y, pred_a, pred_b, ma, mb = scored(two_runs)
    assert pred_a.tolist() != pred_b.tolist()  # the comparison has something to show
    for name, m in (("CLIP", ma), ("SigLIP", mb)):
        row = f"| {name} | {m['macro_precision']:.3f} | {m['macro_recall']:.3f} | {m['macro_f1']:.3f} | {m['accuracy']:.3f} |"
        assert row in md
    for c in CLASSES:
        ra, rb = ma["per_class"][c]["recall"], mb["per_class"][c]["recall"]
        assert f"| {display_name(c)} | {ra:.3f} | {rb:.3f} | {ra - rb:+.3f} | {PER_CLASS} |" in md
        fa, fb = ma["per_class"][c]["f1"], mb["per_class"][c]["f1"]
        assert f"| {display_name(c)} | {fa:.3f} | {fb:.3f} | {fa - fb:+.3f} |" in md
    assert f"**{len(items)} test images**" in md
    # "Where each model wins": every class with a gap is listed under its winner, largest gap first.
    for name, mine, theirs in (("CLIP", ma, mb), ("SigLIP", mb, ma)):
        block = md.split(f"**{name} ahead**")[1].split("**", 1)[0]
        gaps = [float(g) for g in re.findall(rf"\(\+([0-9.]+) for {name}\)", block)]
        wins = [c for c in CLASSES if mine["per_class"][c]["recall"] > theirs["per_class"][c]["recall"]]
        assert len(gaps) == len(wins) >= 1 and gaps == sorted(gaps, reverse=True)

    saved = json.loads((report.parent / "comparison.json").read_text())
    assert saved["metrics"]["a"] == ma and saved["metrics"]["b"] == mb  # exactly, B re-aligned to A's order
    boot = paired_bootstrap(y, pred_b, pred_a, CLASSES, RESAMPLES, 0)  # its "b - a" = CLIP - SigLIP
    for key, label in (("macro_f1", "Macro F1"), ("accuracy", "Accuracy")):
        assert saved["bootstrap"][key]["difference"] == pytest.approx(ma[key] - mb[key])
        for field in ("difference", "ci95_low", "ci95_high"):
            assert saved["bootstrap"][key][field] == boot[key][field]
        b = boot[key]
        assert f"| {label} | {b['difference']:+.3f} | [{b['ci95_low']:+.3f}, {b['ci95_high']:+.3f}] |" in md
    mc = mcnemar_exact(y, pred_a, pred_b)
    assert saved["mcnemar"] == mc
    assert (f"CLIP right and SigLIP wrong on {mc['b']} images, CLIP wrong and SigLIP right on {mc['c']}; "
            f"p = {mc['p_value']:.4g}") in md
    for key, logits, name in (("a", logits_a, "CLIP"), ("b", logits_b, "SigLIP")):
        ece = expected_calibration_error(softmax(rounded(logits)), y, n_bins=15)
        assert saved["ece"][key] == pytest.approx(ece, abs=1e-12)
        assert f"| {name} | {ece:.3f} |" in md


def test_report_shows_the_one_sided_fraction_and_ends_with_a_b_minus_a_verdict_per_metric(two_runs):
    report = two_runs[0]
    md, y, pred_a, pred_b, ma, mb = scored(two_runs)
    boot = paired_bootstrap(y, pred_b, pred_a, CLASSES, RESAMPLES, 0)  # CLIP - SigLIP, as the report computes it
    p = mcnemar_exact(y, pred_a, pred_b)["p_value"]
    verdicts = md.rstrip().splitlines()[-2:]  # the report's last lines
    for line, key, label in zip(verdicts, ("macro_f1", "accuracy"), ("Macro F1", "Accuracy")):
        b = boot[key]
        row = next(r for r in md.splitlines() if r.startswith(f"| {label} | {b['difference']:+.3f} | ["))
        assert row.endswith(f"| {b['fraction_difference_le_0']:.3f} |"), row  # the one-sided fraction, shown
        # SigLIP - CLIP: the observed difference, and the bootstrap's CI mirrored
        assert line.startswith(f"- SigLIP − CLIP {'macro-F1' if key == 'macro_f1' else 'accuracy'} = "
                               f"{mb[key] - ma[key]:+.3f} [{-b['ci95_high']:+.3f}, {-b['ci95_low']:+.3f}], "
                               f"McNemar p = {p:.2g}: "), line
        excludes_zero = b["ci95_low"] > 0 or b["ci95_high"] < 0
        expected = ("significant at 5%" if excludes_zero and p < 0.05 else
                    "not significant at 5%" if not excludes_zero and p >= 0.05 else "mixed at 5%")
        assert line.split(": ", 1)[1].startswith(expected), line
    saved = json.loads((report.parent / "comparison.json").read_text())
    assert saved["verdict"] == [v[2:] for v in verdicts]


def test_verdict_follows_the_tests(test_images, tmp_path):
    strong, weak = fake_logits(test_images, 5, 50.0), fake_logits(test_images, 6, -50.0)  # always / never right
    make_run(tmp_path / "a", test_images, weak, "CLIP", "clip", log=False)
    make_run(tmp_path / "b", test_images, strong, "SigLIP", "siglip", log=False)
    md = compare_runs(tmp_path / "a", tmp_path / "b", tmp_path / "out", n_resamples=RESAMPLES).read_text()
    f1_gap = 1.0 - compute_metrics(np.array([c for _, c in test_images]), weak.argmax(1), CLASSES)["macro_f1"]
    assert md.rstrip().splitlines()[-2].startswith(f"- SigLIP − CLIP macro-F1 = {f1_gap:+.3f} [")
    assert md.rstrip().splitlines()[-1].startswith("- SigLIP − CLIP accuracy = +1.000 [+1.000, +1.000]")
    assert md.rstrip().endswith("significant at 5%") and "not significant" not in md.split("## Verdict")[1]
    make_run(tmp_path / "c", test_images, weak, "SigLIP", "siglip", log=False)  # the same predictions as A
    md = compare_runs(tmp_path / "a", tmp_path / "c", tmp_path / "out2", n_resamples=RESAMPLES).read_text()
    assert md.rstrip().splitlines()[-1] == ("- SigLIP − CLIP accuracy = +0.000 [+0.000, +0.000], McNemar p = 1: "
                                            "not significant at 5%")


def test_report_links_only_existing_pngs(two_runs):
    report = two_runs[0]
    md = report.read_text()
    links = linked_pictures(md)
    expected = {"confusion_clip.png", "confusion_siglip.png", "loss_curves.png", "epoch_times.png",
                "reliability.png", "compare_grid.png", "compare_1.png"}
    assert expected <= set(links)
    for link in links:
        with Image.open(report.parent / link) as image:
            assert image.format == "PNG" and image.width > 200
    assert "SYNTHETIC" not in md and "## Training dynamics" in md
    assert "not comparable" in md  # InfoNCE and sigmoid losses are different objectives


def test_pick_examples_is_seeded_and_categorised():
    rng = np.random.default_rng(0)
    ca, cb = rng.random(200) < 0.7, rng.random(200) < 0.6
    picks = pick_examples(ca.tolist(), cb.tolist(), ("CLIP", "SigLIP"), 5, seed=4)
    assert picks == pick_examples(ca.tolist(), cb.tolist(), ("CLIP", "SigLIP"), 5, seed=4)
    assert picks != pick_examples(ca.tolist(), cb.tolist(), ("CLIP", "SigLIP"), 5, seed=5)
    expected = {"both right": (True, True), "both wrong": (False, False),
                "only CLIP right": (True, False), "only SigLIP right": (False, True)}
    for category, (a_right, b_right) in expected.items():
        assert len(picks[category]) == 5
        assert all(ca[i] == a_right and cb[i] == b_right for i in picks[category])
    few = pick_examples([True, False], [True, True], ("A", "B"), 3, seed=0)
    assert few == {"both right": [0], "both wrong": [], "only A right": [], "only B right": [1]}


def test_summary_statements_follow_the_numbers(test_images, tmp_path):
    strong, weak = fake_logits(test_images, 5, 50.0), fake_logits(test_images, 6, -50.0)  # always / never right
    make_run(tmp_path / "a", test_images, strong, "CLIP", "clip", log=False, synthetic_flag=True)
    make_run(tmp_path / "b", test_images, weak, "SigLIP", "siglip", log=False)
    md = compare_runs(tmp_path / "a", tmp_path / "b", tmp_path / "out", n_resamples=RESAMPLES).read_text()
    assert "SYNTHETIC DEMO — NOT A RESULT ABOUT CLIP OR SIGLIP" in md
    assert "it excludes 0" in md and "it includes 0" not in md
    assert "exact McNemar test rejects equal error rates" in md
    assert f"CLIP has the higher accuracy on {len(CLASSES)} classes and SigLIP on 0" in md
    # Identical predictions: nothing separates the models.
    make_run(tmp_path / "c", test_images, strong, "SigLIP", "siglip", log=False)
    md = compare_runs(tmp_path / "a", tmp_path / "c", tmp_path / "out2", n_resamples=RESAMPLES).read_text()
    assert "the two models have the same macro-F1" in md and "it excludes 0" not in md
    assert "does not reject" in md and "p = 1)" in md
    assert "the same accuracy on every class" in md


def test_runs_without_training_log(test_images, tmp_path):
    logits = fake_logits(test_images, 7, 2.0)
    make_run(tmp_path / "zero_shot", test_images, logits, "CLIP", "clip", log=False)
    make_run(tmp_path / "trained", test_images, fake_logits(test_images, 8, 2.0), "CLIP", "clip", log=True)
    out = tmp_path / "out"
    md = compare_runs(tmp_path / "zero_shot", tmp_path / "trained", out, n_resamples=RESAMPLES).read_text()
    assert "No log.jsonl in the run of CLIP (zero_shot)" in md
    assert "| CLIP (trained) | 5 |" in md and "| CLIP (zero_shot) | 5" not in md
    links = linked_pictures(md)
    assert {"confusion_clip_zero_shot.png", "confusion_clip_trained.png", "loss_curves.png"} <= set(links)
    assert all((out / link).is_file() for link in links)

    shutil.rmtree(out)
    (tmp_path / "trained" / "log.jsonl").unlink()
    md = compare_runs(tmp_path / "zero_shot", tmp_path / "trained", out, n_resamples=RESAMPLES).read_text()
    assert "No log.jsonl in the run of CLIP (zero_shot) and CLIP (trained)" in md
    assert "loss_curves.png" not in md and not (out / "loss_curves.png").exists()


def test_mismatched_test_sets_raise(test_images, tmp_path):
    logits = fake_logits(test_images, 9, 2.0)
    make_run(tmp_path / "a", test_images, logits, "CLIP", "clip")
    make_run(tmp_path / "fewer", test_images[:-1], logits[:-1], "SigLIP", "siglip")
    with pytest.raises(ValueError, match=r"test sets in .* differ \(1 image\(s\) only in the first, 0 only in the second"):
        compare_runs(tmp_path / "a", tmp_path / "fewer", tmp_path / "out")
    relabelled = [(p, (c + 1) % len(CLASSES)) if i == 0 else (p, c) for i, (p, c) in enumerate(test_images)]
    make_run(tmp_path / "relabelled", relabelled, logits, "SigLIP", "siglip")
    with pytest.raises(ValueError, match=r"disagree on the true class of 1 image\(s\)"):
        compare_runs(tmp_path / "a", tmp_path / "relabelled", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        compare_runs(tmp_path / "a", tmp_path / "missing", tmp_path / "out")
