"""Wall time of `python -m har_ref explain`, the whole command as a user runs it (imports included).

    PYTHONPATH=. .venv/bin/python tests/bench/bench_explain.py [--work DIR]

1. the demo's size: 32 synthetic-looking 64 px images, the shipped tiny CLIP and SigLIP (converted).
   Target <= 10 s on 2 cores.
2. real size: CLIP ViT-B/32 and SigLIP base/16-224 with transformers' random weights, saved with
   save_pretrained and converted, 16 photo-sized (400x300) JPEGs, one map per model (the attention
   map; then also with one --class). Target <= 2 s per image.
Each command runs once; wall time, CPU time (user + system, all threads) and the machine's load
average are printed (the CPU is shared: on a loaded machine wall time is mostly waiting).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from har_ref.data.classes import CLASS_NAMES
from har_ref.data.prompts import PromptBank
from har_ref.demo.tiny import CHECKPOINTS
from har_ref.demo.tokenizer_training import train_sentencepiece
from weights_conversion.hf import convert_hf
from weights_conversion.open_clip import clip_tokenizer_files, write_tokenizer


def write_images(folder: Path, count: int, size: tuple[int, int], suffix: str) -> Path:
    """Smooth random colour fields with a bright block each: pictures that compress like photos."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
        image = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BICUBIC), np.float32)
        x, y = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        image[y:y + size[1] // 3, x:x + size[0] // 6] = 240
        noisy = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{i:04d}{suffix}")
    return folder


def real_size_checkpoints(work: Path) -> dict[str, Path]:
    """Random-weight transformers models at the real size, saved as upstream does and converted."""
    import torch
    from open_clip.tokenizer import default_bpe
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    torch.manual_seed(0)
    out = {}
    for family in ("clip", "siglip"):
        if family == "clip":
            model = CLIPModel(CLIPConfig(text_config=dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)))
        else:
            model = SiglipModel(SiglipConfig())
        with contextlib.redirect_stdout(io.StringIO()):  # the converter's notes about tokenizer files
            model.save_pretrained(work / f"{family}-hf")
            out[family] = convert_hf(work / f"{family}-hf", work / family)
        del model
        if family == "clip":
            write_tokenizer(*clip_tokenizer_files(default_bpe()), out[family])
        else:
            texts = PromptBank.from_file(None, list(CLASS_NAMES)).all_prompts()[0]
            train_sentencepiece(texts, work / "spm", 1000)
            (out[family] / "spiece.model").write_bytes((work / "spm" / "spiece.model").read_bytes())
    return out


def timed_explain(weights: list[Path], images: Path, out: Path, extra: list[str] = ()) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system over all threads) of one explain command."""
    command = [sys.executable, "-m", "har_ref", "explain", *(f"--weights={w}" for w in weights), str(images),
               "--out", str(out), *extra]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        tiny = {f: convert_hf(CHECKPOINTS / f, work / "tiny" / f) for f in ("clip", "siglip")}
        small = write_images(work / "demo_images", 32, (64, 64), ".png")
        wall, cpu = timed_explain(list(tiny.values()), small, work / "out_demo")
        print(f"demo size: 32 images of 64 px, tiny CLIP + SigLIP, attention maps: {wall:.1f} s wall, "
              f"{cpu:.1f} s CPU (load average {os.getloadavg()[0]:.1f})", flush=True)
        real = real_size_checkpoints(work)
        photos = write_images(work / "photos", 16, (400, 300), ".jpg")
        for extra, what in (([], "attention map"), (["--class", "texting"], "attention map + one --class map")):
            wall, cpu = timed_explain(list(real.values()), photos, work / "out_real", extra)
            print(f"real size: 16 images of 400x300, CLIP ViT-B/32 + SigLIP B/16, {what}: {wall:.1f} s wall "
                  f"({wall / 16:.2f} s per image), {cpu:.1f} s CPU (load average {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
