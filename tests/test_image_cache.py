"""The preprocessed image cache: exact eval pixels, keys that never reuse a stale entry, augmentation,
bad files, DataLoader workers."""
from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from har_ref.model.config import clip_vit_b32, siglip_base_patch16_224
from har_ref.data.folders import ImageFolderDataset
from har_ref.data.image_cache import CachedImageDataset
from har_ref.model.transforms import build_transform

SIZE = 32
CONFIGS = {"clip": replace(clip_vit_b32(), vision=replace(clip_vit_b32().vision, image_size=SIZE)),
           "siglip": replace(siglip_base_patch16_224(), vision=replace(siglip_base_patch16_224().vision,
                                                                       image_size=SIZE))}
# (width, height): landscape, portrait, square, a thin strip, smaller than S
IMAGE_SIZES = [(61, 40), (37, 75), (48, 48), (90, 13), (20, 27)]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_image(path, width, height, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path)
    return str(path)


@pytest.fixture
def items(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    items = [(write_image(folder / f"{i}.jpg", w, h, i), i % 3) for i, (w, h) in enumerate(IMAGE_SIZES)]
    items.append((write_image(folder / "alpha.png", 33, 29, 9, mode="RGBA"), 1))  # composited onto white
    return items


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_eval_pixels_equal_image_folder_dataset(items, tmp_path, family):
    cfg = CONFIGS[family]
    reference = ImageFolderDataset(items, build_transform(cfg))
    for build in ("miss", "hit"):  # freshly decoded, then read back from the file
        cached = CachedImageDataset(items, cfg, tmp_path / "cache", augment=False)
        assert cached.decoded == (len(items) if build == "miss" else 0)
        assert cached.items == reference.items and cached.skipped == []
        for i in range(len(reference)):
            pixels, class_id, index = cached[i]
            ref_pixels, ref_class, ref_index = reference[i]
            assert pixels.dtype == torch.float32 and pixels.shape == (3, SIZE, SIZE)
            assert torch.equal(pixels, ref_pixels) and (class_id, index) == (ref_class, ref_index)


def test_changed_file_or_transform_is_decoded_again(items, tmp_path):
    cache, cfg = tmp_path / "cache", CONFIGS["siglip"]
    assert CachedImageDataset(items, cfg, cache).decoded == len(items)
    assert CachedImageDataset(items, cfg, cache).decoded == 0
    # touching a file (new modification time, same bytes) invalidates its entry, and only its entry
    path = items[2][0]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert CachedImageDataset(items, cfg, cache).decoded == 1
    # new content under the same name and modification time (size differs): decoded again, new pixels used
    old = CachedImageDataset(items, cfg, cache, augment=False)[2][0]
    write_image(path, 80, 30, seed=123)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    fresh = CachedImageDataset(items, cfg, cache, augment=False)
    assert fresh.decoded == 1 and not torch.equal(fresh[2][0], old)
    assert torch.equal(fresh[2][0], build_transform(cfg)(Image.open(path)))
    # another image size or resize mode is another cache; the first one stays valid
    bigger = replace(cfg, vision=replace(cfg.vision, image_size=SIZE + 8))
    assert CachedImageDataset(items, bigger, cache).decoded == len(items)
    assert CachedImageDataset(items, CONFIGS["clip"], cache).decoded == len(items)
    assert CachedImageDataset(items, cfg, cache).decoded == 0
    assert len(list(cache.glob("*.u8"))) == 3


def test_inconsistent_cache_files_are_rebuilt(items, tmp_path):
    cache, cfg = tmp_path / "cache", CONFIGS["clip"]
    first = CachedImageDataset(items, cfg, cache)
    expected = [first[i][0] for i in range(len(first))]
    first.cache.pixels_path.write_bytes(first.cache.pixels_path.read_bytes()[:100])  # truncated pixel file
    rebuilt = CachedImageDataset(items, cfg, cache, augment=False)
    assert rebuilt.decoded == len(items)
    assert all(torch.equal(rebuilt[i][0], expected[i]) for i in range(len(items)))
    index = json.loads(first.cache.index_path.read_text())
    index["image_size"] = SIZE + 1  # an index that claims another transform is never trusted
    first.cache.index_path.write_text(json.dumps(index))
    assert CachedImageDataset(items, cfg, cache).decoded == len(items)


def test_augmentation_is_random_crop_and_flip_on_top_of_the_cache(items, tmp_path):
    cfg = CONFIGS["siglip"]
    plain = CachedImageDataset(items, cfg, tmp_path / "cache", augment=False)
    augmented = CachedImageDataset(items, cfg, tmp_path / "cache", augment=True)
    assert augmented.decoded == 0  # augmentation does not change what is cached
    before = torch.get_rng_state()
    draws = [augmented[(epoch, 0)][0] for epoch in range(4)]  # EpochSampler's (epoch, index) keys
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG stream is left alone
    assert all(d.shape == (3, SIZE, SIZE) and d.dtype == torch.float32 for d in draws)
    assert not all(torch.equal(draws[0], d) for d in draws[1:])
    assert not any(torch.equal(plain[0][0], d) for d in draws)
    # still normalised uint8 values: (k / 255 - 0.5) / 0.5 for an integer k in [0, 255]
    levels = (draws[0] * 0.5 + 0.5) * 255
    assert torch.allclose(levels, levels.round(), atol=1e-3) and levels.min() >= 0 and levels.max() <= 255
    # a pure function of (seed, epoch, index): the same key gives the same draw, another seed another
    assert torch.equal(augmented[(2, 0)][0], draws[2]) and torch.equal(augmented[0][0], draws[0])
    other_seed = CachedImageDataset(items, cfg, tmp_path / "cache", augment=True, seed=1)
    assert not all(torch.equal(other_seed[(e, 0)][0], d) for e, d in enumerate(draws))


def test_bad_images_are_skipped_and_reported(items, tmp_path):
    folder = tmp_path / "images"
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(open(items[0][0], "rb").read()[:200])
    not_image = folder / "notes.jpg"
    not_image.write_text("not an image")
    bad = [(str(truncated), 0), (str(not_image), 2), (str(folder / "missing.jpg"), 1)]
    mixed = [items[0], *bad, items[1]]
    for _ in range(2):  # the second time from the index, without decoding the bad files again
        ds = CachedImageDataset(mixed, CONFIGS["clip"], tmp_path / "cache")
        assert ds.items == [items[0], items[1]]
        assert [path for path, _ in ds.skipped] == [path for path, _ in bad]
        assert all(reason for _, reason in ds.skipped)
        assert ds[1][1:] == (items[1][1], 1)  # index = position among the readable items
    assert ds.decoded == 0
    with pytest.raises(ValueError, match="None of the 3 images could be read"):
        CachedImageDataset(bad, CONFIGS["clip"], tmp_path / "cache")


def test_works_with_dataloader_workers(items, tmp_path):
    ds = CachedImageDataset(items, CONFIGS["clip"], tmp_path / "cache", augment=False)
    ds[0]  # the parent maps the file; workers must still map their own (the map is not pickled)
    serial = next(iter(DataLoader(ds, batch_size=len(ds), num_workers=0)))
    parallel = list(DataLoader(ds, batch_size=2, num_workers=2))
    assert torch.equal(torch.cat([b[0] for b in parallel]), serial[0])
    assert torch.equal(torch.cat([b[2] for b in parallel]), torch.arange(len(ds)))


def test_unwritable_cache_directory_is_a_clear_error(items, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="Cannot create the image cache directory"):
        CachedImageDataset(items, CONFIGS["clip"], blocker / "cache")
