"""Data: folder splits, the prompt bank, datasets and seeded loaders, and the one-off split preparation.

Layout read by training and evaluation:  DATA/train/<class>/*  and  DATA/test/<class>/*
(class order = sorted folder names; files sorted by name, so item order never depends on the OS).

`prepare_splits` builds that layout from the dataset as distributed (one flat image folder and a
`filename,label` CSV) with a seeded, stratified, per-class split, and writes what it could not use
to prepare_report.json instead of dropping it silently.
"""
from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .distributed import rank, world_size
from .transforms import load_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DEFAULT_PROMPTS = Path(__file__).with_name("prompts.json")
REPORT_EXAMPLES = 5  # how many offending rows/files the prepare report lists per problem


# ---------------------------------------------------------------- prompt bank

def class_phrase(class_name: str) -> str:
    """Folder name -> the phrase put into templates: "listening_to_music" -> "listening to music"."""
    return class_name.replace("_", " ")


def _check_templates(value, path: Path, key: str, exactly_one: bool) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise ValueError(f"{path}: {key} must be a non-empty list of strings; fix the prompt file.")
    for t in value:
        n = t.count("{}")
        if "{" in t.replace("{}", "") or "}" in t.replace("{}", "") or n > 1 or (exactly_one and n != 1):
            need = "exactly one {}" if exactly_one else "at most one {}"
            raise ValueError(f"{path}: template {t!r} in {key} must contain {need} (the class phrase) "
                             "and no other braces; fix the prompt file.")
    return value


class PromptBank:
    """Per-class prompts built from an editable JSON template bank (har_ref/prompts.json).

    Schema: {"templates": [...], "class_templates": {class: [...]}, "replace_templates": {class: [...]}}.
    A class's prompts are the generic `templates` followed by its `class_templates`, unless it has
    `replace_templates` (written by a per-class prompt ablation), which then stand alone. Generic
    templates hold exactly one "{}" for the class phrase; per-class ones hold at most one (they may
    spell the class out, e.g. "a photo of a person typing on a laptop.").
    """

    def __init__(self, class_names: Sequence[str], prompts: dict[str, list[str]]):
        self.class_names = list(class_names)
        self.prompts = prompts  # class name -> filled-in prompt texts

    @classmethod
    def from_file(cls, path: str | Path | None, class_names: Sequence[str]) -> "PromptBank":
        """Read and validate a template file (None: the packaged prompts.json)."""
        path = Path(path) if path is not None else DEFAULT_PROMPTS
        if not path.is_file():
            raise FileNotFoundError(f"Prompt file {path} not found; pass an existing JSON file "
                                    f"(the default is {DEFAULT_PROMPTS}).")
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); fix the prompt file.") from e
        if not isinstance(spec, dict) or "templates" not in spec:
            raise ValueError(f"{path} must be a JSON object with a 'templates' list; fix the prompt file.")
        unknown = sorted(set(spec) - {"templates", "class_templates", "replace_templates"})
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; the allowed keys are 'templates', "
                             "'class_templates' and 'replace_templates'.")
        generic = _check_templates(spec["templates"], path, "'templates'", exactly_one=True)
        per_class = {}
        for key in ("class_templates", "replace_templates"):
            table = spec.get(key, {})
            if not isinstance(table, dict):
                raise ValueError(f"{path}: '{key}' must be an object mapping class names to template lists.")
            for name, value in table.items():
                if name not in class_names:
                    raise ValueError(f"{path}: '{key}' has unknown class {name!r}; the classes are "
                                     f"{', '.join(class_names)}.")
                per_class[key, name] = _check_templates(value, path, f"'{key}'[{name!r}]", exactly_one=False)
        prompts = {}
        for name in class_names:
            templates = (per_class.get(("replace_templates", name))
                         or generic + per_class.get(("class_templates", name), []))
            prompts[name] = [t.replace("{}", class_phrase(name)) for t in templates]
        return cls(class_names, prompts)

    def templates_for(self, class_name: str) -> list[str]:
        """The prompt texts of one class (templates filled with its phrase)."""
        return self.prompts[class_name]

    def sample(self, class_id: int, rng: random.Random) -> str:
        """One prompt of class `class_id`, drawn uniformly: one per training example per step."""
        return rng.choice(self.prompts[self.class_names[class_id]])

    def all_prompts(self) -> tuple[list[str], list[int]]:
        """Every prompt of every class with its class id: the evaluation ensemble."""
        texts, class_ids = [], []
        for class_id, name in enumerate(self.class_names):
            texts += self.prompts[name]
            class_ids += [class_id] * len(self.prompts[name])
        return texts, class_ids


# ---------------------------------------------------------------- folder splits

def find_classes(root: str | Path) -> list[str]:
    """Sorted names of the class folders under `root` (hidden folders ignored)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; the data directory needs train/<class>/ and "
                                "test/<class>/ folders (har_ref.data.prepare_splits builds them from the CSV).")
    names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not names:
        raise ValueError(f"{root} has no class folders; put each class's images in {root}/<class>/.")
    return names


def list_images(folder: Path) -> list[Path]:
    """Image files of one class folder, by extension (case-insensitive), sorted by name.

    Broken links are kept so that the dataset's check reports them instead of hiding them.
    """
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and not p.is_dir())


def build_splits(data_dir: str | Path) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """(train_items, test_items, class_names) with items = (path, class_id)."""
    data_dir = Path(data_dir)
    train_classes, test_classes = find_classes(data_dir / "train"), find_classes(data_dir / "test")
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise ValueError(f"{data_dir}: train and test have different class folders (missing from test: "
                         f"{only_train or 'none'}; missing from train: {only_test or 'none'}); "
                         "make both splits contain the same class folders.")
    splits = []
    for split in ("train", "test"):
        items = []
        for class_id, name in enumerate(train_classes):
            files = list_images(data_dir / split / name)
            if not files:
                raise ValueError(f"{data_dir / split / name} has no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                                 "add images or remove this class folder from both splits.")
            items += [(str(p), class_id) for p in files]
        splits.append(items)
    return splits[0], splits[1], train_classes


def image_problem(path: str | Path) -> str | None:
    """Why PIL cannot decode `path`, or None if it can.

    The file is decoded fully, JPEGs in draft mode (DCT scaling to ~1/8 size): every byte is still
    entropy-decoded, so truncation is caught, while the inverse DCT works on 1/64 of the pixels.
    """
    try:
        with Image.open(path) as image:
            image.draft("RGB", (image.width // 8 + 1, image.height // 8 + 1))
            image.load()
    except Exception as e:  # any failure to decode means the file is unusable
        return f"{type(e).__name__}: {e}"
    return None


class ImageFolderDataset(Dataset):
    """(pixels, class_id, index) for a list of (path, class_id) items.

    Bad files are found once, up front: every file is decoded at construction (see `image_problem`;
    one thread per core, so about the cost of one epoch's decoding); the ones that fail are dropped
    and listed in `self.skipped` as (path, reason) for the caller to report (evaluate.py writes
    them to metrics.json). `index` is the position in `self.items` after skipping, so predictions
    map back to files. A file that fails later (changed on disk during a run) makes __getitem__
    raise load_image's error, which names it: substituting another image would silently change
    the data a metric is computed on.
    """

    def __init__(self, items: Sequence[tuple[str, int]], transform: Callable):
        self.transform = transform
        self.skipped: list[tuple[str, str]] = []
        kept = []
        with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # PIL decodes without the GIL
            problems = list(pool.map(image_problem, [path for path, _ in items]))
        for (path, class_id), problem in zip(items, problems):
            if problem:
                self.skipped.append((str(path), problem))
            else:
                kept.append((str(path), class_id))
        if not kept:
            raise ValueError(f"None of the {len(items)} images could be read (first: {self.skipped[:1]}); "
                             "check the data directory.")
        self.items = kept

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, class_id = self.items[index]
        return self.transform(load_image(path)), class_id, index


# ---------------------------------------------------------------- loaders

def make_train_loader(dataset: Dataset, batch_size: int, workers: int, seed: int,
                      drop_last: bool = True) -> DataLoader:
    """Shuffled loader whose order depends only on (seed, epoch): call `loader.sampler.set_epoch(epoch)`
    before each epoch (without it every epoch repeats epoch 0's order).

    The sampler is always a DistributedSampler: with torch.distributed initialized each rank gets its
    1/world_size shard of the permutation (drop_last keeps shards, hence batch counts, equal); in a
    single process it is the whole permutation.

    Augmentation draws are reproducible for a given (seed, workers, batch_size) run from epoch 0.
    With workers > 0, PyTorch seeds torch, numpy and `random` in worker w from base_seed + w, and
    base_seed comes from the generator seeded here (no worker_init_fn needed; the test checks
    it); persistent workers are seeded once, at the first epoch. With workers == 0 the draws come
    from the global RNGs (seed them). A resumed run gets the same order but new draws.
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True,
                                 seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=drop_last, generator=torch.Generator().manual_seed(seed),
                      persistent_workers=workers > 0,
                      pin_memory=torch.cuda.is_available())


def make_eval_loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    """Loader over every item in order, no shuffling, no dropped tail.

    Not sharded under torch.distributed: every rank sees the whole split (a DistributedSampler
    would pad with repeated items and bias the metrics); evaluate on rank 0.
    """
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())


# ---------------------------------------------------------------- preparing the splits

# A label becomes a folder name, so it must look like one: letters, digits, '_' and '-', not
# starting with '-'. Anything else (empty, spaces, '/', '..') makes the row invalid, and so does
# a filename that is not a plain image file name (a path, or not one of IMAGE_EXTENSIONS).
LABEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def _read_labels(csv_path: Path, images_dir: Path) -> tuple[dict[str, str], dict[str, list], int]:
    """filename -> label for the usable rows, the problems found, and the number of rows."""
    problems = {"invalid_rows": [], "missing_files": [], "duplicate_rows": [], "conflicting_labels": []}
    labels: dict[str, str] = {}
    conflicted: set[str] = set()
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"filename", "label"} <= {c.strip() for c in reader.fieldnames}:
            raise ValueError(f"{csv_path} must start with a 'filename,label' header, got {reader.fieldnames}; "
                             "fix the CSV header.")
        n_rows = 0
        for line, row in enumerate(reader, start=2):
            n_rows += 1
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            name, label = row.get("filename", ""), row.get("label", "")
            example = {"line": line, "filename": name, "label": label}
            if (Path(name).name != name or Path(name).suffix.lower() not in IMAGE_EXTENSIONS
                    or not LABEL_PATTERN.fullmatch(label)):
                problems["invalid_rows"].append(example)
            elif name in conflicted or (name in labels and labels[name] != label):
                problems["conflicting_labels"].append(example)
                conflicted.add(name)
                labels.pop(name, None)
            elif name in labels:
                problems["duplicate_rows"].append(example)
            elif not (images_dir / name).is_file():
                problems["missing_files"].append(example)
            else:
                labels[name] = label
    return labels, problems, n_rows


def _place(src: Path, dst: Path, mode: str) -> str:
    """Link or copy src to dst, falling back symlink -> hardlink -> copy; returns what was done."""
    if mode == "symlink":
        try:
            os.symlink(src.resolve(), dst)
            return "symlink"
        except OSError:  # e.g. no symlink privilege
            mode = "hardlink"
    if mode == "hardlink":
        try:
            os.link(src, dst)
            return "hardlink"
        except OSError:  # e.g. across file systems
            pass
    shutil.copy2(src, dst)
    return "copy"


def prepare_splits(csv_path: str | Path, images_dir: str | Path, out_dir: str | Path, test_per_class: int = 126,
                   seed: int = 0, link: str = "symlink", overwrite: bool = False) -> dict:
    """Build out_dir/{train,test}/<class>/ from a flat image folder and a `filename,label` CSV.

    Per class, files are sorted by name and shuffled by random.Random(f"{seed}:{label}") (string seeds
    are hashed with SHA-512, so the split is the same on every machine and does not depend on the
    other classes); the first `test_per_class` go to test, the rest to train. Rows with an invalid
    filename or label (see LABEL_PATTERN), missing files, repeated rows (the first is kept) and
    files given two different labels (all their rows are dropped) are excluded and reported, as are
    image files no row mentions. The report is returned and written to out_dir/prepare_report.json.
    """
    csv_path, images_dir, out_dir = Path(csv_path), Path(images_dir), Path(out_dir)
    if link not in ("symlink", "hardlink", "copy"):
        raise ValueError(f"link must be 'symlink', 'hardlink' or 'copy', got {link!r}.")
    for path, kind in ((csv_path, "CSV file"), (images_dir, "image folder")):
        if not path.exists():
            raise FileNotFoundError(f"{kind} {path} not found; check the path.")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ValueError(f"{out_dir} is not empty; choose a new output directory or pass overwrite=True.")
        for name in ("train", "test", "prepare_report.json"):
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)

    labels, problems, n_rows = _read_labels(csv_path, images_dir)
    by_class: dict[str, list[str]] = {}
    for name, label in sorted(labels.items()):
        by_class.setdefault(label, []).append(name)
    if not by_class:
        raise ValueError(f"{csv_path} has no usable rows (see the problems: {problems}); fix the CSV.")
    for label, names in sorted(by_class.items()):
        if len(names) <= test_per_class:
            raise ValueError(f"class {label!r} has {len(names)} usable images in {csv_path}, not more than "
                             f"test_per_class={test_per_class}; lower test_per_class or fix the labels.")
    mentioned = set(labels) | {e["filename"] for rows in problems.values() for e in rows}
    unlisted = sorted(p.name for p in images_dir.iterdir()
                      if p.suffix.lower() in IMAGE_EXTENSIONS and p.name not in mentioned)

    used_modes, classes = set(), {}
    for label, names in sorted(by_class.items()):
        random.Random(f"{seed}:{label}").shuffle(names)
        for split, chosen in (("test", names[:test_per_class]), ("train", names[test_per_class:])):
            folder = out_dir / split / label
            folder.mkdir(parents=True)
            for name in chosen:
                used_modes.add(_place(images_dir / name, folder / name, link))
        classes[label] = {"train": len(names) - test_per_class, "test": test_per_class}

    report = {
        "csv": str(csv_path), "images_dir": str(images_dir), "out_dir": str(out_dir),
        "seed": seed, "test_per_class": test_per_class, "rows": n_rows, "used": len(labels),
        "link_requested": link, "link_used": sorted(used_modes), "classes": classes,
        **{k: {"count": len(v), "examples": v[:REPORT_EXAMPLES]} for k, v in problems.items()},
        "unlisted_files": {"count": len(unlisted), "examples": unlisted[:REPORT_EXAMPLES]},
    }
    if used_modes != {link}:
        report["note"] = f"could not create every {link}; fell back to {', '.join(sorted(used_modes - {link}))}."
    (out_dir / "prepare_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
