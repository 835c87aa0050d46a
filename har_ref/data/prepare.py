"""One-off split preparation: the dataset as distributed (one flat image folder and a
`filename,label` CSV) -> DATA/train/<class>/ and DATA/test/<class>/ with a seeded, stratified,
per-class split. What cannot be used is written to prepare_report.json, never dropped silently.
"""
from __future__ import annotations

import csv
import json
import os
import random
import shutil
from pathlib import Path

from .folders import IMAGE_EXTENSIONS

REPORT_EXAMPLES = 5  # how many offending rows/files the prepare report lists per problem

# ---------------------------------------------------------------- preparing the splits

def label_problem(label: str) -> str | None:
    """Why `label` cannot be a class folder name, or None when it can.

    Spaces, hyphens, apostrophes, digits and non-ASCII letters are ordinary in class names
    ("arm wrestling", "café dancing"); only what is unsafe as one folder name is refused.
    """
    if not label:
        return "empty label"
    if "/" in label or "\\" in label:
        return "label contains a path separator ('/' or '\\')"
    if label in (".", ".."):
        return f"label {label!r} names a folder that is not a class"
    if label.startswith("."):
        return "label starts with '.' (a hidden folder)"
    if any(ord(c) < 32 or ord(c) == 127 for c in label):
        return "label contains a control character"
    return None


def _row_problem(name: str, label: str) -> str | None:
    if Path(name).name != name or not name or "\\" in name:
        return "filename is a path, not a file name in the image folder"
    if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
        return f"filename does not end in an image extension ({', '.join(sorted(IMAGE_EXTENSIONS))})"
    return label_problem(label)


def _read_labels(csv_path: Path, images_dir: Path) -> tuple[dict[str, str], dict[str, list], int]:
    """filename -> label for the usable rows, the problems found, and the number of rows."""
    problems = {"invalid_rows": [], "missing_files": [], "duplicate_rows": [], "conflicting_labels": []}
    labels: dict[str, str] = {}
    conflicted: set[str] = set()
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
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
            why = _row_problem(name, label)
            if why is not None:
                problems["invalid_rows"].append({**example, "why": why})
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
    filename or label (see label_problem), missing files, repeated rows (the first is kept) and
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
        # every invalid row, with why: those are the ones to fix in the CSV
        **{k: {"count": len(v), "examples": v if k == "invalid_rows" else v[:REPORT_EXAMPLES]}
           for k, v in problems.items()},
        "unlisted_files": {"count": len(unlisted), "examples": unlisted[:REPORT_EXAMPLES]},
    }
    if used_modes != {link}:
        report["note"] = f"could not create every {link}; fell back to {', '.join(sorted(used_modes - {link}))}."
    (out_dir / "prepare_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")
    return report
