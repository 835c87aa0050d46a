"""Preprocessed image cache: decode and resize every image once, read uint8 pixels afterwards.

On a CPU, decoding and resizing a ~300x400 JPEG costs more than the rest of the data path, and
without a cache it is paid again every epoch. `CachedImageDataset` pays it once: the output of
`to_uint8_resized` (the eval transform before normalisation, uint8 [3, S, S]) is stored in a
memory-mapped file, and every later read is a copy of 3*S*S bytes. Normalisation, and in
training the random crop and flip, are applied on top at read time. Two concerns, two classes:
`ImageCache` builds and updates the files, `CachedImageDataset` reads them as a dataset.

Files, in the cache directory given by the user (one pair per transform, named by
model/transforms.py::transform_name, so two resizes, crops or image sizes never share pixels):

    {name}.u8    uint8 [slots, 3, S, S], append-only
    {name}.json  {"format", "transform", "image_size", "slots",
                  "entries": {absolute path: {"size", "mtime_ns", "slot" | "error"}}}

An entry is reused only when the file's path, size in bytes and modification time (ns) all
match; anything else is decoded again into a new slot (old slots are never rewritten, and the
index is written after the pixels, so an interrupted build cannot leave an entry pointing at the
wrong pixels). Images that cannot be decoded are skipped and recorded, like ImageFolderDataset.
The cache reflects the files at construction time; one process should build a given cache
directory at a time (under DDP, construct the dataset on rank 0 first).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ..model.config import ModelConfig
from ..model.transforms import load_image, normalize_uint8, to_uint8_resized, transform_name
from .folders import check_every_class_readable, item_seed, seeded_global_rng

FORMAT = 1
# The training augmentation of model/transforms.py::build_transform (crop scale 0.6-1, bicubic, flip),
# applied here to the cached S x S image instead of the full-size original.
CROP_SCALE = (0.6, 1.0)


def _file_key(path: str) -> tuple[int, int] | None:
    """(size in bytes, modification time in ns) of `path`, or None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class ImageCache:
    """One transform's cache files in `cache_dir` (the pixel file and its index): building and updating them."""

    def __init__(self, cfg: ModelConfig, cache_dir: str | Path):
        self.cfg, self.size = cfg, cfg.vision.image_size
        cache_dir = Path(cache_dir)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"Cannot create the image cache directory {cache_dir} ({e}); "
                             "pass a writable directory as the cache directory.") from e
        self.name = transform_name(cfg)
        self.pixels_path, self.index_path = cache_dir / f"{self.name}.u8", cache_dir / f"{self.name}.json"

    @property
    def slot_bytes(self) -> int:
        return 3 * self.size * self.size

    def load_index(self) -> dict:
        """The stored index if it belongs to this transform and matches the pixel file, else an empty one."""
        empty = {"format": FORMAT, "transform": self.name, "image_size": self.size, "slots": 0, "entries": {}}
        try:
            index = json.loads(self.index_path.read_text())
        except (OSError, ValueError):
            return empty
        same_transform = (index.get("format"), index.get("transform"), index.get("image_size")) == \
            (FORMAT, self.name, self.size)
        on_disk = self.pixels_path.stat().st_size if self.pixels_path.exists() else -1
        if not same_transform or on_disk < index.get("slots", 0) * self.slot_bytes:
            return empty  # another transform or a truncated pixel file: start over
        return index

    def update(self, paths: list[str]) -> tuple[dict, int]:
        """Decode what the index lacks or holds stale; return the index entries (path -> entry) and
        how many images were decoded (0 when the cache was complete)."""
        index = self.load_index()
        entries = index["entries"]
        todo = []
        for path in dict.fromkeys(paths):  # each path once, in order
            key = _file_key(path)
            entry = entries.get(path)
            if key is None:  # missing or unreadable: report it, do not cache it
                entries[path] = {"error": f"FileNotFoundError: {path} cannot be opened"}
            elif entry is None or (entry.get("size"), entry.get("mtime_ns")) != key:
                todo.append((path, key))
        if todo:
            self._decode(todo, index)
        return entries, len(todo)

    def _decode(self, todo: list[tuple[str, tuple[int, int]]], index: dict) -> None:
        print(f"image cache: decoding {len(todo)} images into {self.pixels_path} (once; later runs reuse it)",
              flush=True)
        slot, step = index["slots"], max(1, len(todo) // 10)
        with open(self.pixels_path, "ab") as f:
            f.truncate(slot * self.slot_bytes)  # drop the tail of an interrupted build
            for i, (path, (size, mtime_ns)) in enumerate(todo):
                try:
                    pixels = to_uint8_resized(load_image(path), self.cfg)
                except Exception as e:  # any failure to decode makes the image unusable (folders.py::image_problem)
                    index["entries"][path] = {"size": size, "mtime_ns": mtime_ns, "error": str(e)}
                else:
                    f.write(pixels.numpy().tobytes())
                    index["entries"][path] = {"size": size, "mtime_ns": mtime_ns, "slot": slot}
                    slot += 1
                if (i + 1) % step == 0 or i + 1 == len(todo):
                    print(f"image cache: {i + 1}/{len(todo)}", flush=True)
        index["slots"] = slot
        tmp = self.index_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, self.index_path)  # the index only ever names pixels already written


class CachedImageDataset(Dataset):
    """(pixels float32 [3, S, S], class_id, index) for (path, class_id) items, read from the cache.

    Same contract as har_ref/data/folders.py::ImageFolderDataset with
    har_ref/model/transforms.py::build_transform(cfg, train=augment, augment=augment): `items` are the readable items in the given order, `skipped` lists
    (path, reason) for the rest, `index` is the position in `items`. Without augmentation the
    pixels are bit-identical to that dataset's. Constructing it brings the cache up to date.
    """

    def __init__(self, items: Sequence[tuple[str, int]], cfg: ModelConfig, cache_dir: str | Path,
                 augment: bool = False, seed: int = 0):
        self.cfg, self.augment, self.seed = cfg, augment, seed
        self.size = cfg.vision.image_size
        self.cache = ImageCache(cfg, cache_dir)
        paths = [os.path.abspath(path) for path, _ in items]
        entries, self.decoded = self.cache.update(paths)  # decoded: images decoded by this construction
        self.items: list[tuple[str, int]] = []
        self.slots: list[int] = []  # row of each item in the pixel file
        self.skipped: list[tuple[str, str]] = []
        for (given, class_id), path in zip(items, paths):
            entry = entries[path]
            if "error" in entry:
                self.skipped.append((str(given), entry["error"]))
            else:
                self.items.append((str(given), class_id))
                self.slots.append(entry["slot"])
        check_every_class_readable(items, self.items, self.skipped)
        self.crop_and_flip = v2.Compose([
            v2.RandomResizedCrop(self.size, scale=CROP_SCALE, interpolation=v2.InterpolationMode.BICUBIC,
                                 antialias=True),
            v2.RandomHorizontalFlip(),
        ])
        self._pixels = None  # opened lazily, so that each DataLoader worker maps the file itself

    def __getstate__(self) -> dict:
        # DataLoader workers (fork or spawn) map the file themselves instead of inheriting a map.
        return {**self.__dict__, "_pixels": None}

    def __len__(self) -> int:
        return len(self.items)

    def uint8(self, index: int) -> torch.Tensor:
        """The cached uint8 [3, S, S] pixels of item `index` (eval transform before normalisation)."""
        if self._pixels is None:
            path = self.cache.pixels_path
            self._pixels = np.memmap(path, dtype=np.uint8, mode="r",
                                     shape=(path.stat().st_size // self.cache.slot_bytes, 3, self.size, self.size))
        return torch.from_numpy(np.array(self._pixels[self.slots[index]]))  # a copy: the map is read-only

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, index = key if isinstance(key, tuple) else (0, key)  # (epoch, index) from EpochSampler
        pixels = self.uint8(index)
        if self.augment:
            with seeded_global_rng(item_seed(self.seed, epoch, index)):
                pixels = self.crop_and_flip(pixels)
        return normalize_uint8(pixels, self.cfg), self.items[index][1], index
