"""What the model's two labelled shortcuts save, each against the plain code it stands for.

    layers.py::transformer_at_rows   vs  transformer(x)[b, rows[b]]           (time)
    vision.py::embed_patches          vs  patch_embed(pixels).flatten(2).mT    (peak memory, time)

Forward + backward of CLIP ViT-B/32's image tower (batch 32, 224 px) and text tower (batch 32,
prompts of 16 tokens), fp32 on the CPU, one thread; random weights (the cost does not depend on
them). After one warm-up call of each step: the peak of live tensor bytes of one call
(tests/allocations.py::tensor_allocations), then rounds interleaved A B C, C B A, ...; median seconds.
Run from the repository root:

    PYTHONPATH=. python tests/bench/bench_shortcuts.py [--rounds 7]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from har_ref.model.config import clip_vit_b32
from har_ref.model.dual_encoder import DualEncoder
from har_ref.model.layers import transformer_at_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers the benchmarks share with the tests
from allocations import tensor_allocations  # noqa: E402


def image_step(vision, pixels, shortcut_rows: bool, patch_matmul: bool):
    def step():
        vision.zero_grad(set_to_none=True)
        if patch_matmul:
            patches = vision.embed_patches(pixels)
        else:
            patches = vision.patch_embed(pixels).flatten(2).transpose(1, 2)
        B, _, D = patches.shape
        x = torch.cat([vision.class_token.expand(B, 1, D), patches], dim=1) + vision.pos_embed
        x = vision.ln_pre(x)
        if shortcut_rows:
            cls = transformer_at_rows(vision.transformer, x, torch.zeros(B, dtype=torch.long))
        else:
            cls = vision.transformer(x)[:, 0]
        vision.proj(vision.ln_post(cls)).square().sum().backward()
    return step


def text_step(text, ids, shortcut_rows: bool):
    def step():
        text.zero_grad(set_to_none=True)
        pool = text.eos_positions(ids)
        x = text.token_embed(ids) + text.pos_embed[:ids.shape[1]]
        if shortcut_rows:
            pooled = transformer_at_rows(text.transformer, x, pool, is_causal=True)
        else:
            pooled = text.transformer(x, is_causal=True)[torch.arange(len(ids)), pool]
        text.proj(text.ln_final(pooled)).square().sum().backward()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DualEncoder(clip_vit_b32()).train()
    pixels = torch.randn(32, 3, 224, 224)
    ids = torch.randint(0, 49000, (32, 16))
    ids[:, -1] = 49407  # <|endoftext|> last: the tower sees 16 tokens, as after its causal cut
    steps = {
        "image: plain": image_step(model.vision, pixels, False, False),
        "image: transformer_at_rows": image_step(model.vision, pixels, True, False),
        "image: embed_patches": image_step(model.vision, pixels, False, True),
        "text: plain": text_step(model.text, ids, False),
        "text: transformer_at_rows": text_step(model.text, ids, True),
    }
    for step in steps.values():
        step()
    results = {name: {"peak_mib": tensor_allocations(step)[1] / 2**20, "seconds": []} for name, step in steps.items()}
    for r in range(args.rounds):
        for name in list(steps) if r % 2 == 0 else list(steps)[::-1]:
            start = time.perf_counter()
            steps[name]()
            results[name]["seconds"].append(time.perf_counter() - start)
    for r in results.values():
        r["median_s"] = statistics.median(r["seconds"])
    for tower in ("image", "text"):
        plain = results[f"{tower}: plain"]
        for name, r in results.items():
            if name.startswith(tower) and r is not plain:
                print(f"{name:28s} {r['median_s']:.3f} s vs {plain['median_s']:.3f} s plain "
                      f"({1 - r['median_s'] / plain['median_s']:.1%} less time); peak {r['peak_mib']:.0f} MiB vs "
                      f"{plain['peak_mib']:.0f} MiB ({1 - r['peak_mib'] / plain['peak_mib']:.1%} less)")


if __name__ == "__main__":
    main()
