"""`python -m har_ref predict`: classify image files or folders with one or more checkpoints.

For every image and every checkpoint it prints the top-k classes with the model's own
probabilities, and says which kind they are. They follow the loss the weights were trained with
(config.json's `loss`, whatever the towers): InfoNCE trains a softmax over the candidate classes, so
its probabilities sum to 1; the sigmoid loss scores each image-text pair with an independent sigmoid,
so its per-class probabilities need not. Scores are computed exactly as evaluate.py scores the test
split (template-ensemble class embeddings, the model's exp(t) * cos (+ b when it has one)), so a
prediction here equals that image's row of predictions.csv.

Label space, per checkpoint: --classes if given, else the run directory's classes.json
(training writes it), else the 15 HAR classes; template bank: --prompts if given, else the
run directory's prompts.json, else the packaged one. Each model's header names both sources.

--json PATH writes one JSON object per image per model (`-`: stdout, and then stdout holds
JSON only). Images are decoded and embedded --batch-size at a time, so a folder of
thousands never holds all its pixels at once; unreadable images are skipped with one line on
stderr each, and only when none could be read is that an error (exit status 2).
With --true and --panel it draws the study's compare_viz panel for one image, with each model's
attention map over it (explain.py::attention_map: CLIP's rollout, SigLIP's probe attention).
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.classes import CLASS_NAMES
from ..data.folders import IMAGE_EXTENSIONS
from ..data.prompts import DEFAULT_PROMPTS, PromptBank
from ..model.config import PROBABILITY_KIND, ModelConfig
from ..model.dual_encoder import load_model
from ..model.tokenizer import load_tokenizer
from ..model.transforms import build_transform, load_image
from .compare_viz import compare_panel, fitted
from .embed import class_embeddings
from .explain import ATTENTION_MAP_NAMES, attention_map, pixel_mass

KIND_HEADER = {"softmax": "softmax probabilities over the {k} classes (sum to 1)",
               "sigmoid": "per-class sigmoid probabilities (independent, need not sum to 1)"}


def probabilities(logits: torch.Tensor, loss: str) -> torch.Tensor:
    # InfoNCE (loss "clip") trains a softmax over candidates; the sigmoid loss a sigmoid per pair (SigLIP eq. 1).
    return logits.softmax(-1) if PROBABILITY_KIND[loss] == "softmax" else logits.sigmoid()


def collect_images(specs: list[str | Path]) -> list[Path]:
    """Files as given; folders walked recursively for IMAGE_EXTENSIONS, sorted, hidden entries skipped.

    A file named on the command line is kept whatever its extension (the user chose it; if it
    does not decode it is skipped later, with the reason). Duplicates keep their first place.
    """
    found: list[Path] = []
    for spec in map(Path, specs):
        if spec.is_dir():
            inside = []
            for folder, dirs, files in os.walk(spec):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                inside += [Path(folder) / f for f in files
                           if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
            if not inside:
                raise ValueError(f"{spec} holds no image files ({', '.join(IMAGE_EXTENSIONS)}, searched "
                                 "recursively, hidden files skipped); pass a folder with images or the files.")
            found += sorted(inside)
        elif spec.exists() or spec.is_symlink():
            found.append(spec)  # a broken link is skipped later with its reason
        else:
            raise FileNotFoundError(f"{spec} does not exist; pass existing image files or folders.")
    return list(dict.fromkeys(found))


def label_space(weights: Path, class_names: list[str] | None, prompts: str | None) -> tuple[list[str], Path, str]:
    """(class names, template bank path, one line naming both sources) for one checkpoint."""
    if class_names is not None:
        source = f"--classes ({len(class_names)})"
    elif (weights / "classes.json").is_file():
        path = weights / "classes.json"
        try:
            class_names = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); fix it or pass --classes.") from e
        if (not isinstance(class_names, list) or not class_names or not all(isinstance(c, str) for c in class_names)
                or len(set(class_names)) != len(class_names)):
            raise ValueError(f"{path} must be a JSON list of distinct class names in label order; "
                             "fix it or pass --classes.")
        source = f"{path} ({len(class_names)})"
    else:
        class_names, source = list(CLASS_NAMES), f"the {len(CLASS_NAMES)} default HAR classes (--classes to change)"
    if prompts is not None:
        bank, bank_source = Path(prompts), f"--prompts {prompts}"
    elif (weights / "prompts.json").is_file():
        bank = weights / "prompts.json"
        bank_source = str(bank)
    else:
        bank, bank_source = DEFAULT_PROMPTS, f"the packaged har_ref/{DEFAULT_PROMPTS.name}"
    return class_names, bank, f"classes: {source}; prompts: {bank_source}"


def decode_batch(paths: list[Path], bad: dict[Path, str]) -> list[tuple[Path, object]]:
    """(path, PIL image) for the paths that decode; the others go into `bad` with their reason,
    reported on stderr once (a second checkpoint meets the same file and stays quiet)."""
    images = []
    for path in paths:
        if path in bad:
            continue
        try:
            images.append((path, load_image(path)))
        except (ValueError, FileNotFoundError) as e:
            cause = e.__cause__
            if cause is None:
                bad[path] = "not a file (a broken link?)"
            elif path.stat().st_size == 0:
                bad[path] = "empty file (0 bytes)"
            else:
                bad[path] = f"{type(cause).__name__}: {cause}"
            print(f"skipped {path}: {bad[path]}", file=sys.stderr, flush=True)
    return images


def fmt(p: float) -> str:
    # sigmoid probabilities of unlikely classes are often tiny: keep their magnitude visible
    return f"{p:.4f}" if p >= 1e-3 else f"{p:.1e}"


class Predictor:
    """One checkpoint with its class embeddings, ready to score batches of decoded images."""

    def __init__(self, weights: str | Path, class_names: list[str] | None, prompts: str | None, device: torch.device):
        self.weights = Path(weights)
        ModelConfig.load(self.weights)  # fail on a missing checkpoint before any image is decoded
        self.class_names, self.bank_path, self.source = label_space(self.weights, class_names, prompts)
        self.bank = PromptBank.from_file(self.bank_path, self.class_names)
        self.device = device

    @torch.no_grad()
    def load(self) -> None:
        self.model = load_model(self.weights, device=self.device)
        self.family, self.loss, self.name = self.model.cfg.family, self.model.cfg.loss, self.model.cfg.name
        self.kind = PROBABILITY_KIND[self.loss]
        self.transform = build_transform(self.model.cfg, train=False)
        self.class_emb = class_embeddings(self.model, load_tokenizer(self.weights), self.bank, self.class_names)

    def pixels(self, images: list) -> torch.Tensor:
        """Decoded images through the model's eval transform, [B, 3, S, S] on the device."""
        return torch.stack([self.transform(image) for image in images]).to(self.device)

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, K] logits of the images against the classes (the same path as evaluate, embed.py)."""
        return self.scores(self.model.encode_image(pixels))

    @torch.no_grad()
    def scores(self, image_emb: torch.Tensor) -> torch.Tensor:
        """[B, K] logits of projected image embeddings: DualEncoder.score of the unit vectors."""
        return self.model.score(F.normalize(image_emb.float(), dim=-1), self.class_emb).cpu()

    def unload(self) -> None:
        del self.model, self.class_emb  # one checkpoint in memory at a time

    def ranked(self, paths: list[Path], top_k: int, batch_size: int, bad: dict[Path, str]):
        """Yields (path, [(class, probability)] best first) per decodable image, batch_size at a time."""
        k = min(top_k, len(self.class_names))
        for start in range(0, len(paths), batch_size):
            batch = decode_batch(paths[start:start + batch_size], bad)
            if not batch:
                continue
            probs = probabilities(self.logits(self.pixels([image for _, image in batch])), self.loss)
            for (path, _), row in zip(batch, probs):
                top = row.topk(k)
                yield path, [(self.class_names[i], v) for v, i in zip(top.values.tolist(), top.indices.tolist())]


def run_predict(weights: list[str], images: list[str], class_names: list[str] | None = None, prompts=None,
                top_k: int = 3, true_class: str | None = None, panel: str | None = None, json_path: str | None = None,
                batch_size: int = 32) -> dict[str, list[str]]:
    """Print (and/or write as JSON lines) the top-k classes of every image for every checkpoint.

    Returns {model name: top-1 class per predicted image}. Raises ValueError/FileNotFoundError
    (one sentence each) on bad arguments, and ValueError when no image could be decoded.
    """
    for flag, value in (("--top-k", top_k), ("--batch-size", batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}.")
    paths = collect_images(images)
    if panel is not None and (true_class is None or len(paths) != 1):
        raise ValueError("--panel draws one image: pass exactly one image file and its --true class.")
    if json_path not in (None, "-") and not Path(json_path).parent.is_dir():
        raise FileNotFoundError(f"--json {json_path}: folder {Path(json_path).parent} does not exist; create it "
                                "or pass another path (or - for stdout).")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    predictors = [Predictor(w, class_names, prompts, device) for w in weights]
    for p in predictors:
        if true_class is not None and true_class not in p.class_names:
            raise ValueError(f"--true {true_class!r} is not one of {p.weights}'s classes: {', '.join(p.class_names)}.")
    text = sys.stderr if json_path == "-" else sys.stdout  # `--json -`: stdout holds JSON lines only
    bad: dict[Path, str] = {}
    predictions: dict[str, list[str]] = {}
    panel_maps: dict[str, tuple[torch.Tensor, ModelConfig]] = {}  # caption -> (the map, its model's config)
    with (open(json_path, "w") if json_path not in (None, "-") else nullcontext(sys.stdout)) as out:
        for p in predictors:
            p.load()
            name = p.name
            if name in predictions:  # two checkpoints of one family: tell them apart by directory
                name = f"{name} ({p.weights.name})"
            predictions[name] = []
            for path, ranked in p.ranked(paths, top_k, batch_size, bad):
                if not predictions[name] and json_path != "-":
                    print(f"{name} [{p.weights}]: {KIND_HEADER[p.kind].format(k=len(p.class_names))}", file=text)
                    print(f"  {p.source}", file=text)
                predictions[name].append(ranked[0][0])
                if json_path != "-":
                    print(f"  {path}: " + ", ".join(f"{c} {fmt(v)}" for c, v in ranked), file=text, flush=True)
                if json_path is not None:
                    out.write(json.dumps({"path": str(path), "model": name, "weights": str(p.weights),
                                          "family": p.family, "loss": p.loss, "probability": p.kind,
                                          "source": p.source,
                                          "top_k": [{"class": c, "probability": v} for c, v in ranked]}) + "\n")
                    out.flush()
            if panel is not None and predictions[name]:
                attention = attention_map(p.model, p.pixels([load_image(paths[0])]))[0].cpu()
                panel_maps[f"{name}: {ATTENTION_MAP_NAMES[p.family]}"] = (attention, p.model.cfg)
            p.unload()
            if not predictions[name]:
                raise ValueError(f"none of the {len(paths)} image(s) could be decoded (each is named above); "
                                 "pass readable JPEG/PNG/BMP/WebP files.")
    if json_path not in (None, "-"):
        print(f"wrote {json_path}", file=text)
    if panel is not None:
        image = load_image(paths[0])
        shown = fitted(image).size
        maps = {caption: pixel_mass(m, image.size, cfg, shown) for caption, (m, cfg) in panel_maps.items()}
        compare_panel(image, true_class, {m: top1[0] for m, top1 in predictions.items()}, maps).save(panel)
        print(f"wrote {panel}", file=text)
    return predictions
