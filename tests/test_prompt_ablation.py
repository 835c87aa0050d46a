"""har_ref.eval.prompt_ablation: the score of (class, template) is attributed right, the validation slice is a
seeded part of train/ only, and the outputs load back (best_prompts.json through PromptBank)."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from har_ref.demo import synthetic
from har_ref.model.config import ModelConfig, TextConfig, VisionConfig
from har_ref.data.folders import ImageFolderDataset, build_splits, make_eval_loader
from har_ref.data.prompts import DEFAULT_PROMPTS, PromptBank, class_phrase
from har_ref.eval.embed import class_embeddings, image_scores
from har_ref.eval.metrics import compute_metrics
from har_ref.model.dual_encoder import DualEncoder, load_model, save_model
from har_ref.eval.prompt_ablation import (ablate_prompts, best_prompts, column_labels, candidate_templates,
                                          score, template_scores, validation_slice)
from har_ref.model.tokenizer import load_tokenizer
from har_ref.demo.tokenizer_training import train_clip_bpe
from har_ref.model.transforms import build_transform

CLASSES = list(synthetic.CLASS_NAMES)
VAL_FRACTION, TRAIN_PER_CLASS = 0.4, 5


def tiny_config(family: str, vocab_size: int = 64, eos: int = 63) -> ModelConfig:
    return ModelConfig(family=family, embed_dim=16,
                       vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64),
                       text=TextConfig(vocab_size=vocab_size, context_length=24, width=32, layers=1, heads=2,
                                       mlp_dim=64, eos_token_id=eos, pad_token_id=eos),
                       logit_bias=-2.0 if family == "siglip" else None)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random CLIP checkpoint with a BPE tokenizer trained on the prompt bank, tiny synthetic data,
    and one ablation run over them."""
    root = tmp_path_factory.mktemp("ablation")
    weights, data, out = root / "weights", root / "data", root / "out"
    texts, _ = PromptBank.from_file(None, CLASSES).all_prompts()
    ids = train_clip_bpe(texts, weights, vocab_size=700)
    torch.manual_seed(0)
    save_model(DualEncoder(tiny_config("clip", ids["vocab_size"], ids["eos_token_id"])), weights)
    synthetic.generate(data, train_per_class=TRAIN_PER_CLASS, test_per_class=2, image_size=32)
    result = ablate_prompts(weights, data, out, val_fraction=VAL_FRACTION, seed=3, top_k=1, batch_size=32,
                            device="cpu", n_resamples=200)
    return weights, data, out, result


def test_outputs_written_and_best_prompts_load(setup):
    weights, data, out, result = setup
    for name in ("prompt_ablation.md", "prompt_ablation.json", "best_prompts.json", "prompt_heatmap.png",
                 "test_ensemble/metrics.json", "test_best/predictions.csv"):
        assert (out / name).is_file(), name
    with Image.open(out / "prompt_heatmap.png") as image:
        assert image.format == "PNG"
    bank = PromptBank.from_file(out / "best_prompts.json", CLASSES)
    default = json.loads(DEFAULT_PROMPTS.read_text())
    for c in CLASSES:
        assert bank.templates_for(c) == [t.replace("{}", class_phrase(c)) for t in result["best"][c]]
        scores = result["scores"][c]
        assert len(result["best"][c]) == 1
        assert [s["template"] for s in scores] == candidate_templates(default, c)  # every template was scored
        best = max(s["f1"] for s in scores)
        assert next(s for s in scores if s["template"] == result["best"][c][0])["f1"] == best
    md = (out / "prompt_ablation.md").read_text()
    test = result["test"]
    for key in ("ensemble", "best"):
        metrics = json.loads((out / f"test_{key}" / "metrics.json").read_text())
        assert test[key]["accuracy"] == metrics["accuracy"] and test[key]["macro_f1"] == metrics["macro_f1"]
    assert test["difference"]["accuracy"]["difference"] == pytest.approx(test["best"]["accuracy"]
                                                                         - test["ensemble"]["accuracy"])
    assert f"| chosen | {test['best']['accuracy']:.3f} | {test['best']['macro_f1']:.3f} |" in md
    assert "honest comparison is the test split" in md


def test_validation_numbers_match_evaluate_machinery(setup):
    """The slice's logits, computed once from embeddings, equal embed.image_scores on the same images,
    for the bank's ensemble and for best_prompts.json."""
    weights, data, out, result = setup
    model, tokenizer = load_model(weights), load_tokenizer(weights)
    train_items, _, classes = build_splits(data)
    dataset = ImageFolderDataset(validation_slice(train_items, classes, VAL_FRACTION, 3),
                                 build_transform(model.cfg))
    for key, prompts in (("ensemble", None), ("chosen", out / "best_prompts.json")):
        emb = class_embeddings(model, tokenizer, PromptBank.from_file(prompts, classes), classes)
        logits, y, _ = image_scores(model, make_eval_loader(dataset, 16, 0), emb)
        metrics = compute_metrics(y, logits.argmax(1), classes)
        assert result["validation"][key]["accuracy"] == metrics["accuracy"]
        assert result["validation"][key]["macro_f1"] == pytest.approx(metrics["macro_f1"], abs=1e-12)
        if key == "ensemble":
            assert result["ensemble_class_f1"] == {c: metrics["per_class"][c]["f1"] for c in classes}


def test_validation_slice_is_seeded_stratified_and_disjoint_from_test(setup):
    _, data, _, result = setup
    train_items, test_items, classes = build_splits(data)
    val = validation_slice(train_items, classes, VAL_FRACTION, seed=3)
    assert [p for p, _ in val] == result["val_paths"]
    assert val == validation_slice(train_items, classes, VAL_FRACTION, seed=3)
    assert val != validation_slice(train_items, classes, VAL_FRACTION, seed=4)
    assert set(val) <= set(train_items) and not {p for p, _ in val} & {p for p, _ in test_items}
    per_class = np.bincount([c for _, c in val], minlength=len(classes))
    assert (per_class == round(VAL_FRACTION * TRAIN_PER_CLASS)).all()
    # A class's slice depends only on its own files: dropping class 0 leaves the others' slices alone.
    others = validation_slice([i for i in train_items if i[1] != 0], classes, VAL_FRACTION, seed=3)
    assert others == [i for i in val if i[1] != 0]
    with pytest.raises(ValueError, match="val_fraction"):
        validation_slice(train_items, classes, 0.0, seed=3)


def test_score_attribution_on_a_constructed_case():
    """Class 0 has three templates: one weak, one that matches every image, one specific to class 0.
    The specific one gets F1 1; the match-everything one has recall 1 but loses on precision."""
    names = ["a", "b", "c"]
    y = np.repeat([0, 1, 2], 4)
    base = np.full((12, 3), 0.0)
    base[np.arange(12), y] = 1.0  # the ensemble is right on every image ...
    base[:4, 0], base[:2, 1] = 0.5, 0.8  # ... except that class 0's first two images go to class 1
    weak = np.full(12, -5.0)
    everything = np.full(12, 3.0)
    specific = np.where(y == 0, 3.0, -5.0)
    other = np.where(y == 1, 2.0, 0.9)  # a class-1 template: it must only move column 1
    prompt_logits = np.stack([weak, everything, specific, other], axis=1)
    prompt_class = np.array([0, 0, 0, 1])
    f1, ce = template_scores(base, prompt_logits, prompt_class, y, names)
    # weak: class 0 never predicted -> F1 0. everything: all 12 images -> class 0, P 4/12, R 1, F1 = 2*4/(4+12).
    # specific: exactly class 0's images -> F1 1. other (class 1): column 1 becomes 0.9 off class 1, above
    # class 0's 0.5 but below class 2's 1.0, so class 1 takes class 0's 4 images: P 4/8, R 1, F1 = 2*4/(4+8).
    np.testing.assert_allclose(f1, [0.0, 0.5, 1.0, 2 / 3])
    assert best_prompts(f1, ce, prompt_class, 3, top_k=1) == [[2], [3], []]
    assert best_prompts(f1, ce, prompt_class, 3, top_k=2) == [[2, 1], [3], []]
    # The cross-entropy is the slice's mean: check one by hand.
    logits = base.copy()
    logits[:, 0] = specific
    expected = np.mean([math.log(np.exp(row).sum()) - row[t] for row, t in zip(logits, y)])
    assert ce[2] == pytest.approx(expected)


def test_ties_go_to_lower_cross_entropy_then_bank_order():
    f1 = np.array([0.5, 0.9, 0.9, 0.9])
    ce = np.array([0.1, 0.7, 0.3, 0.3])
    assert best_prompts(f1, ce, np.zeros(4, int), 1, top_k=3) == [[2, 3, 1]]
    with pytest.raises(ValueError, match="top_k"):
        best_prompts(f1, ce, np.zeros(4, int), 1, top_k=0)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_one_scoring_path(family):
    """Prompt ablation's scores, evaluation's image_scores and the model's own forward logits agree
    (predict is pinned to image_scores in test_predict.py)."""
    torch.manual_seed(0)
    model = DualEncoder(tiny_config(family)).eval()
    pixels = torch.randn(5, 3, 32, 32)
    text_emb = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    expected, _, _ = image_scores(model, [(pixels, torch.zeros(5), torch.arange(5))], text_emb)
    with torch.no_grad():
        image_emb = model.encode_image(pixels)
        forward = model.logits(image_emb, text_emb).numpy()
    np.testing.assert_allclose(score(model, torch.nn.functional.normalize(image_emb, dim=-1), text_emb), expected,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(forward, expected, rtol=1e-6, atol=1e-6)


def test_column_labels_name_shared_and_class_specific_templates():
    spec = json.loads(DEFAULT_PROMPTS.read_text())
    raw = [candidate_templates(spec, c) for c in CLASSES]
    labels = column_labels(raw)
    assert labels[:len(spec["templates"])] == spec["templates"]
    assert labels[len(spec["templates"]):] == ["class-specific 1", "class-specific 2"]  # 'calling' has two


def test_ablation_on_another_label_set_writes_a_loadable_bank(setup, tmp_path):
    """Classes named with a space and an accent, one of them absent from the packaged bank's extras:
    best_prompts.json holds extras only for the classes present, so train/evaluate/predict accept it."""
    import shutil

    weights, data, _, _ = setup
    names = {"calling": "phone call", "dancing": "café dancing", "running": "running"}
    for split in ("train", "test"):
        for old, new in names.items():
            shutil.copytree(data / split / old, tmp_path / "data" / split / new)
    ablate_prompts(weights, tmp_path / "data", tmp_path / "out", val_fraction=VAL_FRACTION, seed=3, top_k=1,
                   batch_size=32, device="cpu", n_resamples=50)
    spec = json.loads((tmp_path / "out" / "best_prompts.json").read_text())
    assert set(spec["class_templates"]) == {"running"}
    bank = PromptBank.from_file(tmp_path / "out" / "best_prompts.json", sorted(names.values()))
    assert bank.templates_for("café dancing")
