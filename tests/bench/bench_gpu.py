"""GPU training throughput and model FLOPs utilization: `python tests/bench/bench_gpu.py`.

A benchmark, not a test (pytest does not collect it). For CLIP ViT-B/32 and SigLIP base/16-224 at
their real sizes, one full training step exactly as train.py takes it: both towers through
`EmbedBoth` under bf16 autocast, the loss in fp32 with same-class positives, backward, AdamW step
(the optimizer train.py builds), logit-scale clamp. Eager, then with `torch.compile` on
EmbedBoth (what `train --compile` does). Weights are random from the presets: throughput does not
depend on their values, and nothing is downloaded.

Text: the study's workload shape. CLIP ids are 8-12 random word-piece ids, <|endoftext|>, then
padding to 77 (the bank's prompts tokenize to 8-12 pieces; tests/bench/bench.py); SigLIP ids fill 64
positions (padding included, which SigLIP attends to).

FLOPs per step are counted once by torch.utils.flop_counter.FlopCounterMode (matmuls and attention,
forward and backward; elementwise ops and the optimizer are not counted, the usual MFU convention,
PaLM appendix B). MFU = FLOPs per step / seconds per step / the device's dense bf16 peak
(H100/H200 SXM: 989 TFLOP/s; pass --peak-tflops for other devices).

On a machine without a GPU, `--device cpu --batch 4 --steps 2` runs the same code path as a smoke
check (the figures then mean nothing).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench_tools import contrastive_loss
from har_ref.model.config import ModelConfig, clip_vit_b32, siglip_base_patch16_224
from har_ref.train.losses import clamp_logit_scale_
from har_ref.model.dual_encoder import DualEncoder
from har_ref.train.optim import autocast, build_optimizer
from har_ref.train.setup import EmbedBoth

DENSE_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}  # vendor spec sheets, dense (no sparsity)
NUM_CLASSES = 15


def study_ids(cfg: ModelConfig, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Token ids shaped like the study's tokenized prompts (module docstring)."""
    text = cfg.text
    if cfg.family == "siglip":
        return torch.randint(2, text.vocab_size, (batch, text.context_length), generator=generator)
    ids = torch.full((batch, text.context_length), text.pad_token_id)
    lengths = torch.randint(8, 13, (batch,), generator=generator)
    for row, n in enumerate(lengths.tolist()):
        ids[row, 0] = text.vocab_size - 2  # <|startoftext|>
        ids[row, 1:n + 1] = torch.randint(256, text.vocab_size - 2, (n,), generator=generator)
        ids[row, n + 1] = text.eos_token_id
    return ids


class TrainingStep:
    """One optimizer step of train.py's loop on a fixed batch (no data loading: the GPU's share alone)."""

    def __init__(self, cfg: ModelConfig, batch: int, device: torch.device, compile_model: bool):
        torch.manual_seed(0)
        self.model = DualEncoder(cfg).to(device).train()
        self.embed = torch.compile(EmbedBoth(self.model)) if compile_model else EmbedBoth(self.model)
        self.optimizer = build_optimizer(self.model, lr=1e-5, weight_decay=0.2)
        g = torch.Generator().manual_seed(1)
        self.pixels = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g).to(device)
        self.ids = study_ids(cfg, batch, g).to(device)
        self.labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
        self.family, self.device = cfg.family, device

    def __call__(self) -> None:
        with autocast("bf16", self.device):
            image, text = self.embed(self.pixels, self.ids)
        image, text = image.float(), text.float()  # losses in fp32, as train.py
        contrastive_loss(self.family, self.model, image, text, self.labels).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        clamp_logit_scale_(self.model.logit_scale, self.family)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_step(step: TrainingStep) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def measure(family: str, cfg: ModelConfig, args, device: torch.device, peak_tflops: float | None,
            compile_model: bool, flops: int | None) -> dict:
    step = TrainingStep(cfg, args.batch, device, compile_model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.warmup):  # the first call compiles (forward and backward) when compiling
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    if flops is None:
        flops = flops_per_step(step)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    result = dict(family=family, compile=compile_model, batch=args.batch, seconds_per_step=seconds,
                  images_per_s=args.batch / seconds, flops_per_step=flops, tflops_per_s=flops / seconds / 1e12,
                  warmup_s=warmup_s, warmup_steps=args.warmup, timed_steps=args.steps)
    if peak_tflops:
        result["mfu"] = result["tflops_per_s"] / peak_tflops
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    mfu = f", MFU {result['mfu']:.1%}" if peak_tflops else ""
    mem = f", peak {result['peak_memory_gib']:.1f} GiB" if device.type == "cuda" else ""
    print(f"{family:<7}{'compiled' if compile_model else 'eager':<9} batch {args.batch}: {seconds * 1e3:8.1f} ms/step, "
          f"{result['images_per_s']:8.0f} images/s, {result['tflops_per_s']:6.1f} TFLOP/s{mfu}{mem} "
          f"(warm-up {warmup_s:.0f} s)", flush=True)
    del step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def device_peak(device: torch.device, given: float | None) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", given
    name = torch.cuda.get_device_name(device)
    known = next((v for k, v in DENSE_BF16_TFLOPS.items() if k in name), None)
    return name, given or known


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/bench/bench_gpu.py", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiling happens here)")
    parser.add_argument("--families", nargs="+", choices=("clip", "siglip"), default=["clip", "siglip"])
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak of the device for MFU (known: " +
                             ", ".join(f"{k} {v}" for k, v in DENSE_BF16_TFLOPS.items()) + ")")
    parser.add_argument("--out", default="bench_gpu.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device here; run it on a GPU machine, or `--device cpu --batch 4 "
                         "--steps 2` for a smoke run.")
    for name in ("torch._dynamo", "torch._inductor"):
        logging.getLogger(name).setLevel(logging.ERROR)  # graph-break notes (CLIP's text truncation)
    torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 parts (loss, optimizer), as any GPU recipe would
    name, peak = device_peak(device, args.peak_tflops)
    print(f"bench_gpu: {name}, torch {torch.__version__}, bf16 autocast, dense bf16 peak "
          f"{f'{peak} TFLOP/s' if peak else 'unknown (no MFU; pass --peak-tflops)'}")
    presets = {"clip": clip_vit_b32, "siglip": siglip_base_patch16_224}
    rows = []
    for family in args.families:
        eager = measure(family, presets[family](), args, device, peak, False, None)
        rows.append(eager)
        if not args.no_compile:
            rows.append(measure(family, presets[family](), args, device, peak, True, eager["flops_per_step"]))
            print(f"{family:<7}torch.compile speedup {eager['seconds_per_step'] / rows[-1]['seconds_per_step']:.2f}x")
    Path(args.out).write_text(json.dumps(dict(device=name, torch=torch.__version__, peak_tflops=peak, rows=rows),
                                         indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
