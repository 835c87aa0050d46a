"""Data: folder splits, image checks, datasets and seeded loaders.

Layout read by training and evaluation:  DATA/train/<class>/*  and  DATA/test/<class>/*, and when it
exists a shifted test split DATA/test_shift/<class>/* (same classes; evaluation scores it too)
(class order = sorted folder names; files sorted by name, so item order never depends on the OS).

prepare.py builds that layout from the dataset as distributed (a flat folder and a CSV); prompts.py
turns class names into the texts the text tower reads.

Training items are addressed as (epoch, index) by `EpochSampler`, so that a random augmentation
is a pure function of (seed, epoch, index): the same on 1 or N ranks, with any number of
workers, and after a resume in the middle of an epoch.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import signal
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..distributed import rank, world_size
from ..model.transforms import check_pixel_count, load_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DEFAULT_SHIFT_SPLIT = "test_shift"  # DATA/test_shift/<class>/: a test split in a style training never sees


# ---------------------------------------------------------------- folder splits

def find_classes(root: str | Path) -> list[str]:
    """Sorted names of the class folders under `root` (hidden folders ignored)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; the data directory needs train/<class>/ and "
                                "test/<class>/ folders (`python -m har_ref prepare` builds them from the dataset's CSV).")
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
    class_names = find_classes(data_dir / "train")
    return split_items(data_dir, "train", class_names), split_items(data_dir, "test", class_names), class_names


def split_items(data_dir: str | Path, split: str, class_names: Sequence[str]) -> list[tuple[str, int]]:
    """The (path, class_id) items of DATA/<split>/, whose class folders must be train's."""
    data_dir = Path(data_dir)
    found = find_classes(data_dir / split)
    if found != list(class_names):
        only_train = sorted(set(class_names) - set(found))
        only_here = sorted(set(found) - set(class_names))
        raise ValueError(f"{data_dir}: train and {split} have different class folders (missing from {split}: "
                         f"{only_train or 'none'}; missing from train: {only_here or 'none'}); "
                         f"make both splits contain the same class folders.")
    items = []
    for class_id, name in enumerate(class_names):
        files = list_images(data_dir / split / name)
        if not files:
            raise ValueError(f"{data_dir / split / name} has no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                             f"add images or remove this class folder from every split.")
        items += [(str(p), class_id) for p in files]
    return items


def hold_out(items: Sequence[tuple[str, int]], fraction: float, seed: int = 0
             ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(kept, held_out): `fraction` of each class's items, drawn with `seed`, set aside as a validation
    part of train (at least one per class when fraction > 0; at least one kept). Order is preserved."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the validation fraction must be in [0, 1), got {fraction}.")
    if fraction == 0.0:
        return list(items), []
    rng = np.random.default_rng(seed)
    chosen = set()
    for class_id in sorted({c for _, c in items}):
        members = [i for i, (_, c) in enumerate(items) if c == class_id]
        count = min(len(members) - 1, max(1, round(fraction * len(members))))
        chosen.update(int(i) for i in rng.choice(members, size=count, replace=False))
    return ([it for i, it in enumerate(items) if i not in chosen],
            [it for i, it in enumerate(items) if i in chosen])


def random_labels(items: Sequence[tuple[str, int]], num_classes: int, seed: int) -> list[tuple[str, int]]:
    """The same images, each with a class drawn uniformly at random (the shuffled-label control:
    a model fine-tuned on these can learn nothing about the classes, only lose what it knew)."""
    drawn = np.random.default_rng([seed, 7]).integers(0, num_classes, len(items))
    return [(path, int(c)) for (path, _), c in zip(items, drawn)]


def write_items(path: str | Path, items: Sequence[tuple[str, int]], class_names: Sequence[str]) -> None:
    """items as a CSV of path,class (e.g. a run's validation.csv), read back by read_items."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("path", "class"), *((p, class_names[c]) for p, c in items)])


def read_items(path: str | Path, class_names: Sequence[str]) -> list[tuple[str, int]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [(row["path"], list(class_names).index(row["class"])) for row in csv.DictReader(f)]


def image_problem(path: str | Path) -> str | None:
    """Why `path` cannot be used as an image, or None if it can.

    The file is decoded fully, JPEGs in draft mode (DCT scaling to ~1/8 size): every byte is still
    entropy-decoded, so truncation is caught, while the inverse DCT works on 1/64 of the pixels.
    Images beyond Pillow's decompression-bomb limit are refused before decoding (model/transforms.py).
    """
    try:
        with Image.open(path) as image:
            check_pixel_count(image)
            image.draft("RGB", (image.width // 8 + 1, image.height // 8 + 1))
            image.load()
    except Exception as e:  # any failure to decode means the file is unusable
        return f"{type(e).__name__}: {e}"
    return None


def non_image_files(data_dir: str | Path) -> list[tuple[str, str]]:
    """(path, reason) for files in the class folders that are not images by name (.DS_Store,
    Thumbs.db, notes.txt): ignored by training, listed in skipped.txt so nothing vanishes unseen."""
    found = []
    for split in ("train", "test"):
        root = Path(data_dir) / split
        for folder in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
            images = set(list_images(folder))
            found += [(str(p), "ignored: not an image file name (" + ", ".join(IMAGE_EXTENSIONS) + ")")
                      for p in sorted(folder.iterdir()) if p.is_file() and p not in images]
    return found


def check_every_class_readable(items: Sequence[tuple[str, int]], kept: Sequence[tuple[str, int]],
                               skipped: Sequence[tuple[str, str]]) -> None:
    """A class (an image's folder, DATA/split/<class>/) whose images were all unreadable would silently
    vanish from training: refuse, naming the folder."""
    if not kept:
        raise ValueError(f"None of the {len(items)} images could be read (first: {skipped[:1]}); "
                         "check the data directory.")
    empty = sorted({Path(p).parent.name for p, _ in items} - {Path(p).parent.name for p, _ in kept})
    if empty:
        folders = sorted({str(Path(p).parent) for p, _ in items if Path(p).parent.name in empty})
        raise ValueError(f"class folder(s) {', '.join(folders)} have no readable image (all were skipped, "
                         "see the reasons above or in skipped.txt); replace the files or remove the class.")


def write_skipped(out_dir: str | Path, split: str, entries: Sequence[tuple[str, str]]) -> None:
    """Record (path, reason) of one split in OUT/skipped.txt (tab-separated: split, path, reason),
    keeping the other splits' lines, so a run lists every file it did not use."""
    path = Path(out_dir) / "skipped.txt"
    header = "# split\tpath\treason: files this run did not use\n"
    kept = [line for line in (path.read_text().splitlines() if path.is_file() else [])
            if line and not line.startswith("#") and line.split("\t", 1)[0] != split]
    lines = kept + [f"{split}\t{p}\t{' '.join(str(r).split())}" for p, r in entries]
    path.write_text(header + "".join(line + "\n" for line in lines))


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed that depends on (seed, epoch, index) only (hash: no collisions between pairs)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@contextmanager
def seeded_global_rng(seed: int):
    """torchvision's random transforms draw from torch's global RNG: seed it for one item only and
    leave the caller's stream exactly as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class ImageFolderDataset(Dataset):
    """(pixels, class_id, index) for a list of (path, class_id) items.

    Bad files are found once, up front: every file is decoded at construction (see `image_problem`;
    one thread per core, so about the cost of one epoch's decoding); the ones that fail are dropped
    and listed in `self.skipped` as (path, reason) for the caller to report (skipped.txt and
    metrics.json). A class left without a readable image is an error naming its folder. `index`
    is the position in `self.items` after skipping, so predictions map back to files. A file that
    fails later (changed on disk during a run) makes __getitem__ raise load_image's error, which
    names it: substituting another image would silently change the data a metric is computed on.

    The key is an index, or (epoch, index) from EpochSampler: with `seed` set, the transform's
    random draws are then seeded by item_seed(seed, epoch, index).
    """

    def __init__(self, items: Sequence[tuple[str, int]], transform: Callable, seed: int | None = None):
        self.transform, self.seed = transform, seed
        self.skipped: list[tuple[str, str]] = []
        kept = []
        with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # PIL decodes without the GIL
            problems = list(pool.map(image_problem, [path for path, _ in items]))
        for (path, class_id), problem in zip(items, problems):
            if problem:
                self.skipped.append((str(path), problem))
            else:
                kept.append((str(path), class_id))
        check_every_class_readable(items, kept, self.skipped)
        self.items = kept

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        path, class_id = self.items[index]
        draws = nullcontext() if self.seed is None else seeded_global_rng(item_seed(self.seed, epoch, index))
        with draws:
            return self.transform(load_image(path)), class_id, index


# ---------------------------------------------------------------- loaders

class EpochSampler(DistributedSampler):
    """DistributedSampler's shuffled shard, yielding (epoch, index) keys, and able to start part-way.

    The order depends only on (seed, epoch) (set_epoch). `set_epoch(epoch, skip=n)` drops the first n
    samples of this rank's shard: a run resumed after n samples of an epoch sees exactly the rest.
    """

    def __init__(self, dataset: Dataset, seed: int, drop_last: bool):
        super().__init__(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed,
                         drop_last=drop_last)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter([(self.epoch, i) for i in list(super().__iter__())[self.skip:]])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class BalancedEpochSampler(EpochSampler):
    """EpochSampler whose every micro-batch holds each class within one of batch_size / K
    (--balanced-batches): the same-class positives per row, hence the share of positive pairs the
    sigmoid loss must match with its bias, are then the same in every batch (docs/losses.md).

    Per (seed, epoch): each class's items are shuffled, the classes put in a shuffled order, and the
    items dealt round-robin, one per class per round; any run of batch_size consecutive items then
    holds floor or ceil of batch_size / K of each class that still has items. Rank r takes the
    global batches r, r + W, r + 2W, ... so its batches are such runs too.
    """

    def __init__(self, dataset: Dataset, labels: Sequence[int], batch_size: int, seed: int, drop_last: bool):
        super().__init__(dataset, seed=seed, drop_last=drop_last)
        self.labels, self.batch_size = list(labels), batch_size
        self.num_samples = len(self.labels) // (batch_size * self.num_replicas) * batch_size  # whole batches

    def order(self, epoch: int) -> list[int]:
        rng = random.Random(f"{self.seed}:{epoch}")
        by_class: dict[int, list[int]] = {}
        for index, label in enumerate(self.labels):
            by_class.setdefault(label, []).append(index)
        classes = sorted(by_class)
        rng.shuffle(classes)
        for c in classes:
            rng.shuffle(by_class[c])
        rounds = max(len(v) for v in by_class.values())
        return [by_class[c][r] for r in range(rounds) for c in classes if r < len(by_class[c])]

    def __iter__(self):
        order, B, W = self.order(self.epoch), self.batch_size, self.num_replicas
        batches = [order[start:start + B] for start in range(0, len(order) - B + 1, B)]
        mine = [i for batch in batches[self.rank::W][:self.num_samples // B] for i in batch]
        return iter([(self.epoch, i) for i in mine[self.skip:]])


def ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which stops cleanly (train/faults.py::StopRequest)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_train_loader(dataset: Dataset, batch_size: int, workers: int, seed: int,
                      drop_last: bool = True, balanced: bool = False) -> DataLoader:
    """Shuffled loader whose order depends only on (seed, epoch): call `loader.sampler.set_epoch(epoch)`
    before each epoch (without it every epoch repeats epoch 0's order).

    The sampler (EpochSampler) is a DistributedSampler: with torch.distributed initialized each
    rank gets its 1/world_size shard of the permutation (drop_last keeps shards, hence batch
    counts, equal); in a single process it is the whole permutation. Augmentation draws are
    seeded per item by the dataset (its `seed`), so they do not depend on the workers; numpy's
    and `random`'s states in worker w are seeded from base_seed + w by PyTorch, base_seed coming
    from the generator seeded here.
    With `balanced`, every batch holds each class within one of batch_size / K (BalancedEpochSampler).
    """
    sampler = (BalancedEpochSampler(dataset, [y for _, y in dataset.items], batch_size, seed, drop_last) if balanced
               else EpochSampler(dataset, seed=seed, drop_last=drop_last))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=drop_last, generator=torch.Generator().manual_seed(seed),
                      persistent_workers=workers > 0, worker_init_fn=ignore_sigint if workers else None,
                      pin_memory=torch.cuda.is_available())


def make_eval_loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    """Loader over every item in order, no shuffling, no dropped tail.

    Not sharded under torch.distributed: every rank sees the whole split (a DistributedSampler
    would pad with repeated items and bias the metrics); evaluate on rank 0.
    """
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
