"""`python -m har_ref predict`: classify single images with one or more checkpoints.

Prints the top-k classes with the model's own probabilities (softmax of the CLIP logits;
per-class sigmoid for SigLIP, whose loss scores each image-text pair independently) and,
with --true and --panel, draws the study's compare_viz panel: ground truth in black, each
model's prediction in green if right and red if wrong.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .data import PromptBank
from .evaluate import MODEL_NAMES, class_embeddings
from .model import DualEncoder, load_model
from .compare_viz import compare_panel
from .tokenizer import load_tokenizer
from .transforms import build_transform, load_image


@torch.no_grad()
def predict_images(model: DualEncoder, tokenizer, images: list[str | Path], class_names: list[str],
                   prompts: str | Path | None = None) -> torch.Tensor:
    """Logits [N_images, K] of one model for the given images (the evaluation's scoring)."""
    class_emb = class_embeddings(model, tokenizer, PromptBank.from_file(prompts, class_names), class_names)
    transform = build_transform(model.cfg, train=False)
    pixels = torch.stack([transform(load_image(p)) for p in images])
    image_emb = torch.nn.functional.normalize(model.encode_image(pixels).float(), dim=-1)
    logits = model.logit_scale.exp() * image_emb @ class_emb.T
    return logits + model.logit_bias if model.logit_bias is not None else logits


def probabilities(logits: torch.Tensor, family: str) -> torch.Tensor:
    # CLIP's InfoNCE trains a softmax over candidates; SigLIP's loss a sigmoid per pair.
    return logits.softmax(-1) if family == "clip" else logits.sigmoid()


def run_predict(weights: list[str], images: list[str], class_names: list[str], prompts=None, top_k: int = 3,
                true_class: str | None = None, panel: str | None = None) -> dict[str, list[str]]:
    """Print the top-k classes of every image for every checkpoint; optionally draw the panel."""
    if true_class is not None and true_class not in class_names:
        raise ValueError(f"--true {true_class!r} is not one of the classes: {', '.join(class_names)}.")
    if panel is not None and (true_class is None or len(images) != 1):
        raise ValueError("--panel draws one image: pass exactly one image and its --true class.")
    predictions: dict[str, list[str]] = {}
    for w in weights:
        model = load_model(w)
        name = MODEL_NAMES[model.cfg.family]
        if name in predictions:  # two checkpoints of one family: tell them apart by directory
            name = f"{name} ({Path(w).name})"
        logits = predict_images(model, load_tokenizer(w), images, class_names, prompts)
        predictions[name] = []
        for path, row in zip(images, probabilities(logits, model.cfg.family)):
            top = row.topk(min(top_k, len(class_names)))
            ranked = ", ".join(f"{class_names[i]} {p:.3f}" for p, i in zip(top.values.tolist(), top.indices.tolist()))
            print(f"{name}  {path}: {ranked}")
            predictions[name].append(class_names[int(top.indices[0])])
    if panel is not None:
        compare_panel(load_image(images[0]), true_class, {m: p[0] for m, p in predictions.items()}).save(panel)
        print(f"wrote {panel}")
    return predictions
