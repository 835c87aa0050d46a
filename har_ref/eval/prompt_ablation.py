"""Per-class prompt ablation (study sec. 6: "run per-class prompt ablations; keep the best per class").

Scoring scheme, i.e. how a score is attributed to one (class c, template t) pair:
start from the evaluation ensemble (every class = the normalized mean of its normalized prompt
embeddings, embed.class_embeddings); replace class c's embedding by template t's embedding alone,
keep every other class at its ensemble, classify the validation slice, and score the F1 of class c.
Recall rewards t for pulling c's images in; precision penalizes t for also pulling in other classes'
images (a recall-only score would crown a template that matches every image). Ties go to the lower
cross-entropy over the whole slice, then to the earlier template. Only column c of the logit matrix
changes, so every pair costs one dot product on image embeddings computed once.

The validation slice is a seeded, stratified part of train/ (never test/). Choosing on it and
reporting on it flatters the chosen prompts, and a model fine-tuned on train/ has seen those images;
the honest comparison is `compare_on_test`, which scores both prompt sets on the test split.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.folders import ImageFolderDataset, build_splits, make_eval_loader
from ..data.prompts import DEFAULT_PROMPTS, PromptBank
from ..model.config import MODEL_NAMES
from ..model.dual_encoder import DualEncoder, load_model
from ..model.tokenizer import load_tokenizer
from ..model.transforms import build_transform
from .drawing import display_name
from .embed import class_embeddings, embed_images, embed_texts
from .evaluate import evaluate_model
from .heatmaps import plot_prompt_heatmap
from .metrics import compute_metrics, mcnemar_exact, paired_bootstrap
from .run_results import read_predictions


def validation_slice(train_items: list[tuple[str, int]], class_names: list[str], val_fraction: float,
                     seed: int) -> list[tuple[str, int]]:
    """round(val_fraction * n_c) (at least 1) items of every class c, drawn by random.Random(f"{seed}:{name}")
    (as prepare.prepare_splits) so a class's slice depends only on the seed, its name and its own files;
    returned sorted by path."""
    if not 0.0 < val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in (0, 1], got {val_fraction}; e.g. 0.2 holds out 20% per class.")
    chosen = []
    for class_id, name in enumerate(class_names):
        items = sorted(item for item in train_items if item[1] == class_id)
        random.Random(f"{seed}:{name}").shuffle(items)
        chosen += items[:max(1, round(val_fraction * len(items)))] if items else []
    return sorted(chosen)


def candidate_templates(spec: dict, class_name: str) -> list[str]:
    """A class's raw templates in PromptBank's order (its replace_templates, else generic + its own)."""
    replaced = spec.get("replace_templates", {}).get(class_name)
    return replaced or spec["templates"] + spec.get("class_templates", {}).get(class_name, [])


# ---------------------------------------------------------------------------- embeddings


# ---------------------------------------------------------------------------- scoring


@torch.no_grad()
def score(model: DualEncoder, image_emb: torch.Tensor, text_emb: torch.Tensor) -> np.ndarray:
    """The model's logits of unit embeddings as a numpy array (DualEncoder.score)."""
    return model.score(image_emb, text_emb).cpu().numpy()


def template_scores(base_logits: np.ndarray, prompt_logits: np.ndarray, prompt_class: np.ndarray,
                    y_true: np.ndarray, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(F1 of its class [T], mean cross-entropy of the slice [T]) for every prompt t.

    base_logits [N, K]: the ensemble's class logits; prompt_logits [N, T]: each prompt's logit per
    image; prompt_class [T]: the class each prompt belongs to. Prompt t replaces column
    prompt_class[t] of base_logits, every other column stays.
    """
    f1, cross_entropy = np.zeros(len(prompt_class)), np.zeros(len(prompt_class))
    rows = np.arange(len(y_true))
    for t, c in enumerate(prompt_class):
        logits = base_logits.copy()
        logits[:, c] = prompt_logits[:, t]
        metrics = compute_metrics(y_true, logits.argmax(1), class_names)
        f1[t] = metrics["per_class"][class_names[c]]["f1"]
        shifted = logits - logits.max(axis=1, keepdims=True)  # -log softmax = logsumexp - logit, stably
        cross_entropy[t] = (np.log(np.exp(shifted).sum(axis=1)) - shifted[rows, y_true]).mean()
    return f1, cross_entropy


def best_prompts(f1: np.ndarray, cross_entropy: np.ndarray, prompt_class: np.ndarray, num_classes: int,
                 top_k: int) -> list[list[int]]:
    """Per class, the indices of its top_k prompts: highest F1, then lowest cross-entropy, then earliest."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    chosen = []
    for c in range(num_classes):
        own = [t for t in range(len(prompt_class)) if prompt_class[t] == c]
        chosen.append(sorted(own, key=lambda t: (-f1[t], cross_entropy[t], t))[:top_k])
    return chosen


def _accuracy_f1(metrics: dict) -> dict:
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


# ---------------------------------------------------------------------------- test split


def compare_on_test(model: DualEncoder, tokenizer, data_dir: str | Path, out_dir: str | Path,
                    best_prompts_file: str | Path, base_prompts: str | Path | None = None,
                    batch_size: int = 64, workers: int = 0, n_resamples: int = 10_000, seed: int = 0) -> dict:
    """Evaluate the base bank and the chosen prompts on the test split (OUT/test_ensemble, OUT/test_best)
    and compare them image by image: differences are chosen − ensemble, with paired bootstrap CIs."""
    out_dir = Path(out_dir)
    name = MODEL_NAMES[model.cfg.family]
    results, preds = {}, {}
    for key, prompts in (("ensemble", base_prompts), ("best", best_prompts_file)):
        run_dir = out_dir / f"test_{key}"
        metrics = evaluate_model(model, tokenizer, data_dir, run_dir, prompts, batch_size, workers,
                                 label=f"{name}, {key} prompts")
        results[key] = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "dir": str(run_dir)}
        class_names, rows, _ = read_predictions(run_dir / "predictions.csv")
        preds[key] = {path: (true, pred) for path, true, pred in rows}
    paths = sorted(preds["ensemble"])
    index = {c: k for k, c in enumerate(class_names)}
    y_true = np.array([index[preds["ensemble"][p][0]] for p in paths])
    pred_ens, pred_best = (np.array([index[preds[k][p][1]] for p in paths]) for k in ("ensemble", "best"))
    boot = paired_bootstrap(y_true, pred_ens, pred_best, class_names, n_resamples, seed)  # best − ensemble
    results["difference"] = {m: {k: boot[m][k] for k in ("difference", "ci95_low", "ci95_high")}
                             for m in ("macro_f1", "accuracy")}
    results["mcnemar"] = mcnemar_exact(y_true, pred_ens, pred_best)  # b: only ensemble right
    results["num_images"] = len(paths)
    return results


# ---------------------------------------------------------------------------- report


def column_labels(raw_by_class: list[list[str]]) -> list[str]:
    """Column j: the template itself when every class's j-th template is that one, else 'class-specific i'."""
    labels, specific = [], 0
    for j in range(max(len(r) for r in raw_by_class)):
        shared = {r[j] if j < len(r) else None for r in raw_by_class}
        if len(shared) == 1:
            labels.append(shared.pop())
        else:
            specific += 1
            labels.append(f"class-specific {specific}")
    return labels


def _signed(x: float) -> str:
    return f"{x:+.3f}"


def write_markdown(path: Path, result: dict) -> None:
    classes, scores = result["class_names"], result["scores"]
    labels = column_labels([[s["template"] for s in scores[c]] for c in classes])
    short = [f"T{j + 1}" for j in range(len(labels))]
    val = result["validation"]
    out = ["# Per-class prompt ablation", "",
           f"- Weights: `{result['weights']}`; data: `{result['data']}`; prompt bank: `{result['prompts']}`.",
           f"- Validation slice: {result['val_images']} images of train/ ({result['val_fraction']:.0%} of each "
           f"class, seed {result['seed']}); test/ is not used for choosing.",
           "- Score of (class c, template t): the F1 of class c on the slice when c is represented by t "
           "alone and every other class by its prompt ensemble. Ties: lower cross-entropy, then bank order.",
           f"- Kept per class: the best {result['top_k']} template(s), written to `best_prompts.json` "
           "(`--prompts best_prompts.json` for train, evaluate and predict).",
           "- If the weights were fine-tuned on this train/, the slice was seen in training: its numbers "
           "rank templates, they do not measure generalization.", "",
           "## Class × template (F1 of the class on the validation slice; chosen in bold)", ""]
    out.append("| Class | ensemble | " + " | ".join(short) + " |")
    out.append("|" + "---|" * (len(short) + 2))
    for c in classes:
        chosen = set(result["best"][c])
        cells = [(f"**{s['f1']:.3f}**" if s["template"] in chosen else f"{s['f1']:.3f}") for s in scores[c]]
        cells += ["—"] * (len(short) - len(cells))
        out.append(f"| {display_name(c)} | {result['ensemble_class_f1'][c]:.3f} | " + " | ".join(cells) + " |")
    out += ["", "Columns:", ""]
    out += [f"- {s}: " + (f"{label} (listed below)" if label.startswith("class-specific") else f"`{label}`")
            for s, label in zip(short, labels)] + [""]
    if any(label.startswith("class-specific") for label in labels):
        out += ["Class-specific templates:", ""]
        out += [f"- {display_name(c)}: " + "; ".join(f"{short[j]} `{s['template']}`" for j, s in enumerate(scores[c])
                                                     if labels[j].startswith("class-specific")) for c in classes]
        out.append("")
    width = min(len(scores[c]) for c in classes)
    out += ["![Prompt heatmap](prompt_heatmap.png)", "",
            f"The heatmap shows the ensemble and the columns every class has (T1-T{width})"
            + (f"; {_span(width + 1, len(short))} in the table only." if width < len(short) else "."),
            "", "## Chosen prompts", ""]
    out += [f"- {display_name(c)}: " + "; ".join(f"`{t}`" for t in result["best"][c]) for c in classes]
    out += ["", "## Validation slice: ensemble vs chosen prompts", "",
            "| Prompts | Accuracy | Macro F1 |", "|---|---|---|",
            f"| ensemble (bank) | {val['ensemble']['accuracy']:.3f} | {val['ensemble']['macro_f1']:.3f} |",
            f"| chosen | {val['chosen']['accuracy']:.3f} | {val['chosen']['macro_f1']:.3f} |", "",
            "These prompts were chosen on this slice, so this comparison flatters them; "
            "the honest comparison is the test split below.", "", "## Test split: ensemble vs chosen prompts", ""]
    test = result["test"]
    if test is None:
        out.append("Not run (evaluate_test=False); call `compare_on_test` to score both prompt sets on test/.")
    else:
        d, mc = test["difference"], test["mcnemar"]
        out += [f"{test['num_images']} test images; chosen − ensemble, 95% paired bootstrap CI:", "",
                "| Prompts | Accuracy | Macro F1 |", "|---|---|---|",
                f"| ensemble (bank) | {test['ensemble']['accuracy']:.3f} | {test['ensemble']['macro_f1']:.3f} |",
                f"| chosen | {test['best']['accuracy']:.3f} | {test['best']['macro_f1']:.3f} |",
                f"| chosen − ensemble | {_signed(d['accuracy']['difference'])} [{_signed(d['accuracy']['ci95_low'])}, "
                f"{_signed(d['accuracy']['ci95_high'])}] | {_signed(d['macro_f1']['difference'])} "
                f"[{_signed(d['macro_f1']['ci95_low'])}, {_signed(d['macro_f1']['ci95_high'])}] |", "",
                f"Exact McNemar: only the ensemble right on {mc['b']} images, only the chosen prompts right on "
                f"{mc['c']}; p = {mc['p_value']:.4g}. Runs: `{test['ensemble']['dir']}`, `{test['best']['dir']}`."]
    path.write_text("\n".join(out).rstrip() + "\n", encoding="utf-8")


def ablate_prompts(weights_dir: str | Path, data_dir: str | Path, out_dir: str | Path, val_fraction: float = 0.2,
                   seed: int = 0, top_k: int = 1, batch_size: int = 64, workers: int = 0,
                   prompts: str | Path | None = None, device: str | None = None, evaluate_test: bool = True,
                   n_resamples: int = 10_000) -> dict:
    """Score every (class, template) of the bank on a validation slice of train/; write OUT/prompt_ablation.md,
    prompt_heatmap.png, best_prompts.json and prompt_ablation.json; with evaluate_test, also compare both
    prompt sets on test/ (compare_on_test). Returns what prompt_ablation.json holds."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(weights_dir, device=device), load_tokenizer(weights_dir)
    train_items, _, class_names = build_splits(data_dir)
    prompts_path = Path(prompts) if prompts is not None else DEFAULT_PROMPTS
    bank = PromptBank.from_file(prompts_path, class_names)
    spec = json.loads(prompts_path.read_text())
    raw = {c: candidate_templates(spec, c) for c in class_names}
    texts, prompt_class = bank.all_prompts()
    prompt_class = np.asarray(prompt_class)

    dataset = ImageFolderDataset(validation_slice(train_items, class_names, val_fraction, seed),
                                 build_transform(model.cfg, train=False))
    image_emb, y_true, _ = embed_images(model, make_eval_loader(dataset, batch_size, workers))
    base = score(model, image_emb, class_embeddings(model, tokenizer, bank, class_names))
    prompt_emb = embed_texts(model, tokenizer, texts)
    f1, cross_entropy = template_scores(base, score(model, image_emb, prompt_emb), prompt_class, y_true,
                                        class_names)
    chosen = best_prompts(f1, cross_entropy, prompt_class, len(class_names), top_k)
    # The chosen prompts as evaluate will use them: each class = the normalized mean of its chosen prompts.
    chosen_emb = F.normalize(torch.stack([prompt_emb[idx].mean(0) for idx in chosen]), dim=-1)

    first = {c: int(np.flatnonzero(prompt_class == k)[0]) for k, c in enumerate(class_names)}
    best = {c: [raw[c][t - first[c]] for t in chosen[k]] for k, c in enumerate(class_names)}
    best_file = out_dir / "best_prompts.json"
    best_file.write_text(json.dumps({"templates": spec["templates"],
                                     "class_templates": {c: t for c, t in spec.get("class_templates", {}).items()
                                                         if c in class_names},  # a bank for this label set
                                     "replace_templates": best}, indent=2) + "\n")
    ensemble = compute_metrics(y_true, base.argmax(1), class_names)
    chosen_metrics = compute_metrics(y_true, score(model, image_emb, chosen_emb).argmax(1), class_names)
    result = {
        "weights": str(weights_dir), "data": str(data_dir), "prompts": str(prompts_path),
        "val_fraction": val_fraction, "seed": seed, "top_k": top_k,
        "val_images": len(dataset), "val_paths": [p for p, _ in dataset.items], "skipped_images": dataset.skipped,
        "class_names": class_names,
        "scores": {c: [{"template": raw[c][t - first[c]], "prompt": texts[t], "f1": float(f1[t]),
                        "cross_entropy": float(cross_entropy[t])}
                       for t in np.flatnonzero(prompt_class == k)] for k, c in enumerate(class_names)},
        "ensemble_class_f1": {c: ensemble["per_class"][c]["f1"] for c in class_names},
        "best": best,
        "validation": {"ensemble": _accuracy_f1(ensemble), "chosen": _accuracy_f1(chosen_metrics)},
        "test": None,
    }
    if evaluate_test:
        result["test"] = compare_on_test(model, tokenizer, data_dir, out_dir, best_file, prompts, batch_size,
                                         workers, n_resamples, seed)
    width = min(len(raw[c]) for c in class_names)  # a heatmap needs a value in every cell
    plot_prompt_heatmap([[result["ensemble_class_f1"][c]] + [s["f1"] for s in result["scores"][c][:width]]
                         for c in class_names], class_names,
                        ["ensemble (bank)"] + column_labels([raw[c][:width] for c in class_names]),
                        out_dir / "prompt_heatmap.png", "Per-class F1 by prompt template (validation slice)")
    write_markdown(out_dir / "prompt_ablation.md", result)
    (out_dir / "prompt_ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _span(first: int, last: int) -> str:
    return f"T{first} is" if first == last else f"T{first}-T{last} are"
