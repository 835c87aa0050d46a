"""WiSE-FT (Wortsman et al. 2022): weight-space ensembles of the zero-shot and the fine-tuned model.

    theta(alpha) = (1 - alpha) * theta_zero_shot + alpha * theta_fine_tuned        (WiSE-FT eq. 1)

alpha = 0 is the zero-shot checkpoint, alpha = 1 the fine-tuned one; in between the paper finds
models that keep much of the zero-shot model's robustness and most of the fine-tuned accuracy. Every
tensor is mixed, the temperature t and SigLIP's bias b included. Both checkpoints must share the
architecture (the fine-tuned one was trained from the zero-shot one). The mix is the fine-tuned model's
kind: its loss (config.json), so its probability rule, and its b. A b only the fine-tuned run has (CLIP
towers trained with the sigmoid loss, from a CLIP checkpoint without b) is the run's at every alpha: the
zero-shot end has no b to mix with, and b moves every class's logit alike, so it changes no prediction,
only the sigmoid probabilities.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..data.folders import (DEFAULT_SHIFT_SPLIT, ImageFolderDataset, build_splits, make_eval_loader, read_items,
                            split_items)
from ..data.prompts import PromptBank
from ..model.dual_encoder import DualEncoder, load_model, save_model
from ..model.tokenizer import TOKENIZER_FILES, load_tokenizer
from ..model.transforms import build_transform
from .embed import class_embeddings, embed_images
from .metrics import compute_metrics

RUN_LABEL_FILES = ("classes.json", "prompts.json")  # a run's label space travels with its weights
ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


def interpolate(zero_shot: DualEncoder, fine_tuned: DualEncoder, alpha: float) -> DualEncoder:
    """A new model with theta(alpha) (eq. 1). alpha 0 and 1 return the endpoints' tensors exactly."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--alpha must be between 0 (zero-shot) and 1 (fine-tuned), got {alpha}.")
    if zero_shot.cfg.architecture() != fine_tuned.cfg.architecture():
        raise ValueError("the zero-shot and fine-tuned checkpoints have different config.json architectures; "
                         "WiSE-FT mixes a fine-tuned model with the checkpoint it was fine-tuned from.")
    a, b = zero_shot.state_dict(), fine_tuned.state_dict()
    mixed = {k: a[k] if alpha == 0 and k in a else b[k] if alpha == 1 or k not in a else torch.lerp(a[k], b[k], alpha)
             for k in b}
    model = DualEncoder(fine_tuned.cfg)
    model.load_state_dict(mixed)
    return model.eval()


def wise_ft(zero_shot: str | Path, fine_tuned: str | Path, alpha: float, out: str | Path) -> Path:
    """`python -m har_ref wise-ft`: write theta(alpha) as a checkpoint directory that loads like any other,
    with the fine-tuned run's tokenizer, classes and prompts."""
    zero_shot, fine_tuned, out = Path(zero_shot), Path(fine_tuned), Path(out)
    if out.resolve() in (zero_shot.resolve(), fine_tuned.resolve()):
        raise ValueError(f"--out {out} is one of the two checkpoints; write the mix to another directory.")
    start, end = load_model(zero_shot), load_model(fine_tuned)
    if start.logit_bias is None and end.logit_bias is not None:
        print(f"[wise-ft] {zero_shot} has no logit bias b: the mix keeps {fine_tuned}'s "
              f"b = {end.logit_bias.item():.6g} (it changes no prediction, only the sigmoid probabilities)")
    model = interpolate(start, end, alpha)
    save_model(model, out)
    for name in TOKENIZER_FILES + RUN_LABEL_FILES:
        if (fine_tuned / name).is_file():
            shutil.copy(fine_tuned / name, out / name)
    (out / "wise_ft.json").write_text(json.dumps({"zero_shot": str(zero_shot), "fine_tuned": str(fine_tuned),
                                                  "alpha": alpha}, indent=2) + "\n")
    return out


@torch.no_grad()
def accuracy_curve(zero_shot: str | Path, fine_tuned: str | Path, data: str | Path,
                   alphas=ALPHAS, batch_size: int = 128, autocast=None,
                   shift_split: str | None = DEFAULT_SHIFT_SPLIT) -> list[dict]:
    """Accuracy and macro-F1 of theta(alpha) for each alpha, with the fine-tuned run's prompts: on the
    test split ("accuracy", "macro_f1"), on the shifted test split ("shift", when DATA/<shift_split>/
    exists) and on the run's validation part of train ("validation", when the run held one out: its
    validation.csv), the split alpha is chosen on (best_alpha). `autocast`: the image tower's precision,
    as the run's own evaluation used it (then alpha = 1 reproduces the run's metrics.json exactly)."""
    fine_tuned = Path(fine_tuned)
    a, b = load_model(zero_shot), load_model(fine_tuned)
    tokenizer = load_tokenizer(fine_tuned)
    _, test_items, class_names = build_splits(data)
    splits = {"test": test_items}
    if shift_split and (Path(data) / shift_split).is_dir():
        splits["shift"] = split_items(data, shift_split, class_names)
    if (fine_tuned / "validation.csv").is_file():
        splits["validation"] = read_items(fine_tuned / "validation.csv", class_names)
    prompts = fine_tuned / "prompts.json" if (fine_tuned / "prompts.json").is_file() else None
    bank = PromptBank.from_file(prompts, class_names)
    transform = build_transform(b.cfg, train=False)
    loaders = {name: make_eval_loader(ImageFolderDataset(items, transform), batch_size, 0)
               for name, items in splits.items()}
    curve = []
    for alpha in alphas:
        model = interpolate(a, b, alpha)
        text = class_embeddings(model, tokenizer, bank, class_names)
        point = {"alpha": alpha}
        for name, loader in loaders.items():
            image_emb, labels, _ = embed_images(model, loader, autocast)
            m = compute_metrics(labels, model.score(image_emb, text).argmax(1).numpy(), class_names)
            scores = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
            point.update(scores) if name == "test" else point.update({name: scores})
        curve.append(point)
    return curve


def best_alpha(curve: list[dict]) -> float:
    """The alpha of the highest validation macro-F1 (the smallest such alpha on ties); never chosen on test."""
    if not all("validation" in p for p in curve):
        raise ValueError("choosing alpha needs the run's validation part of train: fine-tune with "
                         "--val-fraction (e.g. 0.2) so the run holds one out.")
    return max(curve, key=lambda p: (p["validation"]["macro_f1"], -p["alpha"]))["alpha"]
