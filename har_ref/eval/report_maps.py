"""The report's section "What each model looks at": where each model's image tower gathers from, before
and after fine-tuning, in three views (the maps are explain.py's; what they are and are not: docs/explain.md).

1. The most confused class pairs: 4 test images per pair, each model's attention map (zero-shot and
   fine-tuned) and the fine-tuned model's class-specific maps for the pair's two classes.
2. The embedding map: the test images' unit embeddings in a 2-D PCA plane, coloured by class, the
   class text embeddings marked (embedding_map.py).
3. The pointing game over the test split (and the shifted one): the share of each attention map's mass
   inside the person's box and the prop's box that the data's boxes.json records, next to the uniform
   map's share (explain.py::pointing_game).

The images are the ones the report's numbers are about, read from the first run's predictions csv
files. Each image is decoded once and goes through each tower once (explain.py::trace_image_tower):
that forward gives both the map and the embedding. Class maps, which need a backward, are computed for
the pictured images only.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..data.prompts import PromptBank
from ..model.dual_encoder import DualEncoder, load_model
from ..model.tokenizer import load_tokenizer
from ..model.transforms import build_transform, load_image, normalize_uint8, to_uint8_resized
from .compare_viz import fitted
from .drawing import display_name
from .embed import class_embeddings
from .embedding_map import Panel, pca_2d, plot_embedding_map, project
from .explain import ATTENTION_MAP_NAMES, class_maps, pixel_mass, pointing_game, trace_image_tower, traced_attention_map
from .explain_viz import PAIR_CELL_PX, pair_picture
from .run_results import RunResults, load_run

PAIRS, IMAGES_PER_PAIR = 3, 4


@dataclass
class ExplainInputs:
    """What the section needs besides the two run directories (which hold the fine-tuned weights)."""

    data: Path  # the data directory both runs were evaluated on; its boxes.json, if any, feeds the pointing game
    zero_shot: dict[str, Path] = field(default_factory=dict)  # family -> pretrained checkpoint (optional)
    batch_size: int = 128


@dataclass(eq=False)  # compared by identity: field by field would compare tensors
class Weights:
    """One model of the section: a run's fine-tuned checkpoint, or the zero-shot one it started from."""

    name: str  # the report's name of the run ("CLIP")
    stage: str  # "zero-shot" | "fine-tuned, seed 0"
    path: Path
    model: DualEncoder
    class_emb: torch.Tensor  # [K, D] unit, from the run's prompts (embed.py::class_embeddings)
    transform: Callable

    @property
    def label(self) -> str:
        return f"{self.name}, {self.stage}"


def load_weights(name: str, stage: str, path: Path, run: RunResults) -> Weights:
    bank = run.directory / "prompts.json"
    model = load_model(path)
    class_emb = class_embeddings(model, load_tokenizer(path), PromptBank.from_file(bank if bank.is_file() else None,
                                                                                  run.class_names), run.class_names)
    return Weights(name, stage, Path(path), model, class_emb, build_transform(model.cfg, train=False))


def fine_tuned_stage(run: RunResults) -> str:
    """"fine-tuned, seed k" from the run's train_config.json: a map is one seed's weights."""
    config = run.directory / "train_config.json"
    seed = json.loads(config.read_text()).get("seed") if config.is_file() else None
    return "fine-tuned" if seed is None else f"fine-tuned, seed {seed}"


def section_models(runs: tuple[RunResults, RunResults], names: tuple[str, str],
                   inputs: ExplainInputs) -> list[list[Weights]]:
    """Per run: [zero-shot (when inputs name its family's checkpoint), fine-tuned]."""
    models = []
    for run, name in zip(runs, names):
        if not (run.directory / "model.safetensors").is_file():
            raise ValueError(f"{run.directory} holds no model.safetensors, so its maps cannot be drawn; pass run "
                             "directories written by `python -m har_ref train`, or leave out the explain inputs.")
        zero_shot = inputs.zero_shot.get(run.family)
        models.append(([load_weights(name, "zero-shot", Path(zero_shot), run)] if zero_shot else [])
                      + [load_weights(name, fine_tuned_stage(run), run.directory, run)])
    return models


# ---------------------------------------------------------------------------- one pass over a split


@dataclass
class Scan:
    """Every image of a split through every model: attention maps, unit embeddings, image sizes."""

    paths: list[str]
    labels: np.ndarray  # [N] class ids
    sizes: list[tuple[int, int]]
    maps: list[np.ndarray]  # per model [N, grid_h, grid_w]
    embeddings: list[np.ndarray]  # per model [N, D], unit length


@torch.no_grad()
def scan(models: list[Weights], paths: list[str], labels: np.ndarray, batch_size: int) -> Scan:
    """Each image decoded once; per model, one traced forward gives its map and its embedding."""
    maps, embeddings = [[] for _ in models], [[] for _ in models]
    sizes = []
    for start in range(0, len(paths), batch_size):
        images = [load_image(p) for p in paths[start:start + batch_size]]
        sizes += [image.size for image in images]
        resized = {}  # the eval transform split at uint8 (model/transforms.py): resized once per input size and mode
        for m, weights in enumerate(models):
            cfg = weights.model.cfg
            key = (cfg.vision.image_size, cfg.resize)
            if key not in resized:
                resized[key] = torch.stack([to_uint8_resized(image, cfg) for image in images])
            trace = trace_image_tower(weights.model.vision, normalize_uint8(resized[key], cfg))
            maps[m].append(traced_attention_map(trace).numpy())
            embeddings[m].append(F.normalize(trace.embedding.float(), dim=-1).numpy())
    return Scan(paths, labels, sizes, [np.concatenate(x) for x in maps], [np.concatenate(x) for x in embeddings])


# ---------------------------------------------------------------------------- confused pairs


def confused_pairs(confusion: np.ndarray, top: int = PAIRS) -> list[tuple[int, int, int]]:
    """(i, j, count) with i < j for the `top` class pairs confused most either way, count = C[i, j] + C[j, i]
    (C[t, p]: images of class t predicted p); most first, ties in class order, pairs never confused left out."""
    confusion = np.asarray(confusion)
    i, j = np.triu_indices(len(confusion), k=1)
    counts = confusion[i, j] + confusion[j, i]
    order = np.lexsort((j, i, -counts))
    return [(int(i[k]), int(j[k]), int(counts[k])) for k in order[:top] if counts[k] > 0]


def pair_images(true: np.ndarray, preds: list[np.ndarray], i: int, j: int, count: int, seed: int) -> list[int]:
    """Up to `count` test rows for the pair (i, j): first images of class i that a model put in j and images
    of j that a model put in i, taken in turn, then other images of the two classes; drawn with `seed`."""
    rng = np.random.default_rng(seed)
    directions = [np.flatnonzero((true == t) & np.any([p == o for p in preds], axis=0)) for t, o in ((i, j), (j, i))]
    queues = [list(rng.permutation(rows)) for rows in directions]
    picked: list[int] = []
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(int(queue.pop(0)))
    rest = [int(r) for r in rng.permutation(np.flatnonzero((true == i) | (true == j))) if r not in picked]
    return picked + rest[:count - len(picked)]


def draw_pairs(a: RunResults, names: tuple[str, str], numbers: dict, models: list[list[Weights]], test: Scan,
               data: Path, out_dir: Path, seed: int) -> list[tuple[str, str]]:
    """One PNG per confused pair; returns [(file, caption)]."""
    classes = a.class_names
    confusion = {k: np.asarray(numbers["metrics"][k]["confusion"]) for k in ("a", "b")}
    true = np.asarray(test.labels)
    preds = [np.array([classes.index(p) for p in a.pred]),
             np.array([classes.index(p) for p in numbers["pred_b_aligned"]])]
    files = []
    for n, (i, j, count) in enumerate(confused_pairs(confusion["a"] + confusion["b"]), start=1):
        rows = pair_images(true, preds, i, j, IMAGES_PER_PAIR, seed)
        images = [load_image(test.paths[r]) for r in rows]
        ci, cj = display_name(classes[i]), display_name(classes[j])
        columns = [("zero-shot", "attention", 0), ("fine-tuned", "attention", 0), ("fine-tuned", f"why {ci}", 1),
                   ("fine-tuned", f"why {cj}", 1)]
        scales = ["Colour scale of the attention maps (both models, zero-shot and fine-tuned):",
                  f"Colour scale of the class maps (why {ci}, why {cj}; both models):"]
        blocks = [{"image": im, "caption": _relative(test.paths[r], data), "true": classes[true[r]],
                   "predictions": {names[0]: a.pred[r], names[1]: numbers["pred_b_aligned"][r]}, "rows": []}
                  for im, r in zip(images, rows)]
        for run_models in models:
            tuned = run_models[-1]
            pixels = torch.stack([tuned.transform(im) for im in images])
            why = class_maps(tuned.model, pixels, tuned.class_emb, [i, j])
            label = f"{tuned.label} ({ATTENTION_MAP_NAMES[tuned.model.cfg.family]}; why: gradient x attention)"
            for k, (block, r) in enumerate(zip(blocks, rows)):
                attention = {w.stage: test.maps[_index(models, w)][r] for w in run_models}
                cells = [attention.get("zero-shot"), attention[tuned.stage], why[0][k], why[1][k]]
                shown = fitted(block["image"], PAIR_CELL_PX).size
                block["rows"].append((label, [None if m is None else pixel_mass(m, block["image"].size, tuned.model.cfg,
                                                                                shown) for m in cells]))
        runs_text = "; ".join(f"{name}: {ci} -> {cj} {int(c[i, j])}, {cj} -> {ci} {int(c[j, i])}"
                              for name, c in zip(names, confusion.values()))
        file = f"looks_pair_{n}.png"
        pair_picture([f"{ci} vs {cj}: {count} test images confused either way", f"({runs_text})"], columns,
                     scales, blocks, out_dir / file)
        files.append((file, f"{ci} vs {cj}: {count} test images confused either way by the two models ({runs_text})"))
    return files


def _index(models: list[list[Weights]], weights: Weights) -> int:
    return [w for run_models in models for w in run_models].index(weights)


def _relative(path: str, data: Path) -> str:
    """The path as boxes.json keys it ("test/texting/0003.png"), or as given when outside DATA."""
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(data))
    return str(path) if relative.startswith("..") else Path(relative).as_posix()


# ---------------------------------------------------------------------------- embedding map


def draw_embedding_map(models: list[list[Weights]], test: Scan, class_names: list[str], out_dir: Path) -> str:
    """Per run one row of panels (zero-shot, fine-tuned), each family projected on its own PCA plane."""
    rows = []
    for run_models in models:
        index = [_index(models, w) for w in run_models]
        mean, components, variance = pca_2d([test.embeddings[k] for k in index])
        rows.append([Panel(w.label, project(test.embeddings[k], mean, components), test.labels,
                           project(w.class_emb.cpu().numpy(), mean, components), variance)
                     for w, k in zip(run_models, index)])
    file = "embedding_map.png"
    plot_embedding_map(rows, class_names, out_dir / file,
                       "Test image embeddings (dots) and class text embeddings (diamonds), 2-D PCA per family")
    return file


# ---------------------------------------------------------------------------- pointing game


def read_boxes(data: Path) -> dict | None:
    path = data / "boxes.json"
    return json.loads(path.read_text()) if path.is_file() else None


def pointing_numbers(models: list[list[Weights]], scans: dict[str, Scan], boxes: dict, data: Path) -> dict:
    """Per split, per model: the mean share of the attention map's mass inside the person's box and inside the
    prop's box (images with a prop), the uniform map's, and map_minus_uniform; fine_tuned_minus_zero_shot per run."""
    flat = [w for run_models in models for w in run_models]
    result: dict = {"maps": {w.label: ATTENTION_MAP_NAMES[w.model.cfg.family] for w in flat}, "splits": {},
                    "fine_tuned_minus_zero_shot": {}}
    for split, s in scans.items():
        found = [boxes.get(_relative(p, data)) for p in s.paths]
        rows = []
        for m, w in enumerate(flat):
            row = {"model": w.name, "stage": w.stage, "weights": str(w.path), "images": len(s.paths),
                   "images_with_boxes": sum(b is not None for b in found)}
            for part in ("person", "prop"):
                share, uniform = pointing_game(s.maps[m], [b and b[part] for b in found], s.sizes, w.model.cfg)
                kept = ~np.isnan(share)
                row[part] = {"map": float(share[kept].mean()) if kept.any() else None,
                             "uniform": float(uniform[kept].mean()) if kept.any() else None,
                             "map_minus_uniform": float((share - uniform)[kept].mean()) if kept.any() else None,
                             "images": int(kept.sum())}
            rows.append(row)
        result["splits"][split] = rows
        for run_models in models:
            if len(run_models) == 2:
                zs, ft = (next(r for r in rows if r["model"] == w.name and r["stage"] == w.stage) for w in run_models)
                result["fine_tuned_minus_zero_shot"].setdefault(split, {})[run_models[1].name] = {
                    part: None if zs[part]["map"] is None else ft[part]["map"] - zs[part]["map"]
                    for part in ("person", "prop")}
    return result


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def pointing_table(numbers: dict) -> list[str]:
    header = ["Split", "Model", "Weights", "Person box: map", "uniform", "map − uniform", "Prop box: map", "uniform",
              "map − uniform", "Images (with a prop)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for split, rows in numbers["splits"].items():
        for r in rows:
            p, q = r["person"], r["prop"]
            diff = [("-" if d["map_minus_uniform"] is None else f"{d['map_minus_uniform']:+.3f}") for d in (p, q)]
            lines.append("| " + " | ".join([split, r["model"], r["stage"], _share(p["map"]), _share(p["uniform"]),
                                            diff[0], _share(q["map"]), _share(q["uniform"]), diff[1],
                                            f"{p['images']} ({q['images']})"]) + " |")
    return lines


# ---------------------------------------------------------------------------- the section


def explain_section(a: RunResults, b: RunResults, names: tuple[str, str], numbers: dict, inputs: ExplainInputs,
                    out_dir: Path, seed: int = 0) -> list[str]:
    """Write the section's PNGs and pointing_game.json into out_dir; returns its markdown lines."""
    data = Path(inputs.data)
    models = section_models((a, b), names, inputs)
    flat = [w for run_models in models for w in run_models]
    index = {name: k for k, name in enumerate(a.class_names)}
    scans = {"test": scan(flat, a.paths, np.array([index[t] for t in a.true]), inputs.batch_size)}
    boxes = read_boxes(data)
    if boxes is not None and (a.directory / "predictions_shift.csv").is_file():  # the shift split: pointing only
        shift = load_run(a.directory, "_shift")
        scans["test_shift"] = scan(flat, shift.paths, np.array([index[t] for t in shift.true]), inputs.batch_size)
    pairs = draw_pairs(a, names, numbers, models, scans["test"], data, out_dir, seed)
    embedding = draw_embedding_map(models, scans["test"], a.class_names, out_dir)

    def where(w: Weights) -> str:
        return f"{w.label}: `{w.path}`"

    out = ["## What each model looks at", "",
           "Each model's attention map is a distribution over its image patches, drawn over the image as density "
           f"(one colour scale per picture): {names[0]}'s {ATTENTION_MAP_NAMES[a.family]}, {names[1]}'s "
           f"{ATTENTION_MAP_NAMES[b.family]}. A class map (\"why C\") weights the attention by the gradient of the "
           "score of class C (Chefer et al. 2021). A map shows where a tower gathers from, not why it decides; "
           "what each map is and is not: docs/explain.md. The maps are from these weights (a fine-tuned "
           "run's are one seed's): "
           + "; ".join(where(w) for w in flat) + ".", ""]
    out += ["### The most confused class pairs", "",
            f"The {len(pairs)} class pairs the two fine-tuned models confuse most (images of one class predicted as "
            f"the other, either way, both models' counts summed), {IMAGES_PER_PAIR} test images each: first images "
            "a model put in the pair's other class, then other images of the two classes (seed "
            f"{seed}). Per image, the true class and both predictions (green right, red wrong), then per model its "
            "attention map zero-shot and fine-tuned and the fine-tuned model's class maps for the pair's classes.", ""]
    if not pairs:
        out += ["Neither model confuses any two classes on the test split: no pair to show.", ""]
    for file, caption in pairs:
        out += [f"![{caption}]({file})", "", f"*{caption}*", ""]
    out += ["### Embedding map", "",
            "The test images' unit embeddings (dots, coloured by true class) and each model's class text embeddings "
            "(diamonds: the normalized mean of the class's prompt embeddings, from the run's prompts) projected on "
            "two principal components. Each family has one projection, fitted on its zero-shot and fine-tuned image "
            "embeddings together, so its two panels share coordinates; CLIP's and SigLIP's spaces are unrelated, so "
            "they are not projected together, but every panel has the same scale on both axes. Tight single-colour "
            "clusters are classes the model separates; a diamond inside its cluster is a class whose prompts point "
            "at its images.", "", f"![Embedding map]({embedding})", "",
            "*Test image embeddings and class text embeddings, 2-D PCA per family, one scale*", ""]
    out += ["### Pointing game", ""]
    if boxes is None:
        out += [f"{data} has no boxes.json (the synthetic generator writes one; real datasets have none): no "
                "pointing game.", ""]
        return out
    pointing = pointing_numbers(models, scans, boxes, data)
    (out_dir / "pointing_game.json").write_text(json.dumps(pointing, indent=2) + "\n")
    out += ["The share of each attention map's mass inside the person's box and inside the action prop's box "
            f"({data / 'boxes.json'}, the generator's own boxes), averaged over the split's images (the prop box "
            "over images that have a prop), next to the uniform map's share, which is the box's share of the "
            "image the model sees: map − uniform > 0 means the map sits on the box more than chance "
            "(har_ref/eval/explain.py::pointing_game). Numbers also in pointing_game.json.", ""]
    out += pointing_table(pointing) + [""]
    for split, runs in pointing["fine_tuned_minus_zero_shot"].items():
        out.append(f"Fine-tuned − zero-shot, {split}: " + "; ".join(
            f"{name} person {d['person']:+.3f}, prop {d['prop']:+.3f}" if d["prop"] is not None else
            f"{name} person {d['person']:+.3f}" for name, d in runs.items()) + ".")
    return out + [""]
