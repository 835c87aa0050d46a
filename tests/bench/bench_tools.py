"""The parts of `make bench` that are not model comparisons: how time and memory are measured,
the losses at the study's scale, and the data path with and without the uint8 image cache.
Imported by tests/bench/bench.py (run it, not this file)."""
from __future__ import annotations

import contextlib
import io
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from har_ref.data.folders import ImageFolderDataset
from har_ref.data.image_cache import CachedImageDataset
from har_ref.demo.synthetic import CLASS_NAMES, render
from har_ref.model.config import clip_vit_b32
from har_ref.model.transforms import build_transform
from har_ref.train.losses import balanced_pos_weight, clip_loss, siglip_loss
from har_ref.train.xbm import CrossBatchMemory

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers the benchmarks share with the tests
from allocations import tensor_allocations  # noqa: E402
from tiny_checkpoint import make_tiny_checkpoint  # noqa: E402


# ----------------------------------------------------------------------------- measuring

def peak_memory_mib(fn: Callable[[], None]) -> float:
    """Run fn() once; the most tensor memory it had allocated at any moment, in MiB."""
    return tensor_allocations(fn)[1] / 2**20


def interleaved(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, dict]:
    """A warm-up call of each step (peak memory measured there), then `rounds` alternating rounds."""
    result = {name: {"peak_mib": peak_memory_mib(step), "seconds": []} for name, step in steps.items()}
    names = list(steps)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:  # alternate the order: drift hits everyone alike
            start = time.perf_counter()
            steps[name]()
            result[name]["seconds"].append(time.perf_counter() - start)
    for entry in result.values():
        entry["median_s"] = statistics.median(entry["seconds"])
    return result


def paired_ratios(ours: dict, theirs: dict) -> list[float]:
    """Upstream time / har-ref time of each round, from calls run back to back: pairing cancels the
    load of other processes better than a ratio of two medians. Their median is the speedup; their
    spread shows the noise of this shared machine."""
    return [t / o for o, t in zip(ours["seconds"], theirs["seconds"])]


# ----------------------------------------------------------------------------- losses at scale

def contrastive_loss(family: str, model, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor | None):
    """The family's loss as train.py computes it (same-class positives when labels are given)."""
    if family == "clip":
        return clip_loss(image, text, model.logit_scale, labels)
    return siglip_loss(image, text, model.logit_scale, model.logit_bias, labels)


def bench_losses(rounds: int, batch: int = 256, memory: int = 32_000, dim: int = 768) -> list[dict]:
    """One loss forward + backward at the report's scale: batch 256 against a 32,000-entry XBM."""
    g = torch.Generator().manual_seed(3)
    xbm = CrossBatchMemory(memory, dim)
    xbm.enqueue(torch.randn(memory, dim, generator=g), torch.randn(memory, dim, generator=g),
                torch.randint(0, 15, (memory,), generator=g))
    mem = xbm.get()
    image = torch.randn(batch, dim, generator=g, requires_grad=True)
    text = torch.randn(batch, dim, generator=g, requires_grad=True)
    labels = torch.randint(0, 15, (batch,), generator=g)
    scale, bias = torch.tensor(2.3, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    pos_weight = balanced_pos_weight(labels, mem.labels)
    steps = {
        "clip_loss": lambda: clip_loss(image, text, scale, labels, memory=mem).backward(),
        "siglip_loss": lambda: siglip_loss(image, text, scale, bias, labels, pos_weight, memory=mem).backward(),
    }
    measured = interleaved(steps, rounds)
    return [dict(loss=name, batch=batch, memory=memory, dim=dim, **m) for name, m in measured.items()]


# ----------------------------------------------------------------------------- data path

def write_photos(folder: Path, count: int) -> list[tuple[str, int]]:
    """JPEGs of HAR's typical size (~400x300): synthetic scenes upscaled, with sensor-like noise."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(4)
    items = []
    for i in range(count):
        class_id = i % len(CLASS_NAMES)
        image = render(CLASS_NAMES[class_id], rng, 96).resize((400, 300), Image.Resampling.BICUBIC)
        noisy = np.asarray(image, np.float32) + rng.normal(0, 6, (300, 400, 3))
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)
        items.append((str(path), class_id))
    return items


def images_per_second(dataset) -> float:
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    return len(dataset) / (time.perf_counter() - start)


def bench_loader(work: Path, count: int) -> dict:
    """Training-time image loading (decode + resize + augment) with and without the uint8 cache."""
    items = write_photos(work / "photos", count)
    cfg = clip_vit_b32()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    try:
        plain = ImageFolderDataset(items, build_transform(cfg, train=True, augment=True))
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            cached = CachedImageDataset(items, cfg, work / "cache", augment=True)
        build_s = time.perf_counter() - start
        result = dict(images=count, size="400x300 JPEG", transform="CLIP 224 train (crop + flip)",
                      decode_every_epoch=images_per_second(plain), cached=images_per_second(cached),
                      cache_build_s=build_s)
    finally:
        torch.set_num_threads(threads)
    return result


# ----------------------------------------------------------------------------- accumulation modes

def bench_accumulation(work: Path, rounds: int, micro_batch: int = 8, accum_steps: int = 4) -> list[dict]:
    """One optimizer step's gradients (no optimizer) of `accum_steps` micro-batches, one process, on the
    demo's tiny checkpoints through loop.py: independent accumulation (a contrastive problem per
    micro-batch) against cached (GradCache: one problem over all, at the price of a no-grad forward
    of every micro-batch, the loss on the cached embeddings, and a second forward with grad)."""
    from har_ref.data.prompts import PromptBank
    from har_ref.demo.synthetic import generate
    from har_ref.train import loop
    from har_ref.train.config import TrainConfig
    from har_ref.train.setup import reread_micro_batch, setup

    data = work / "accumulation-data"
    generate(data, train_per_class=4, test_per_class=1, image_size=64, seed=0)
    texts, _ = PromptBank.from_file(None, list(CLASS_NAMES)).all_prompts()
    rows = []
    for family in ("clip", "siglip"):
        weights = make_tiny_checkpoint(family, texts, work / f"accumulation-{family}", seed=0)
        cfg = TrainConfig(model=family, epochs=1, micro_batch=micro_batch, accum_steps=accum_steps, xbm_size=0,
                          precision="fp32", workers=0, lr=1e-5)
        with contextlib.redirect_stdout(io.StringIO()):
            run, state = setup(cfg, weights, data, work / f"accumulation-run-{family}", resume=False, overwrite=False)
        batches = [reread_micro_batch(run, 0, list(range(k * micro_batch, (k + 1) * micro_batch)))
                   for k in range(accum_steps)]

        def independent():
            for k, batch in enumerate(batches):
                loop.independent_micro_step(run, state, batch, last_of_step=k == accum_steps - 1)
            run.model.zero_grad(set_to_none=True)

        def cached():
            loop.cached_step(run, state, batches)
            run.model.zero_grad(set_to_none=True)

        measured = interleaved({"independent": independent, "cached": cached}, rounds)
        rows.append(dict(family=family, micro_batch=micro_batch, accum_steps=accum_steps,
                         params=sum(p.numel() for p in run.model.parameters()),
                         overhead=statistics.median(paired_ratios(measured["independent"], measured["cached"])),
                         **measured))
    return rows
