"""`make demo`: the study in miniature, offline, in a few minutes on two CPU cores.

The study fine-tunes pretrained CLIP and SigLIP and compares them. No pretrained weights or datasets
can be downloaded here, so the demo brings its own: tiny CLIP and SigLIP pretrained by the project on
synthetic image-caption pairs (pretrain.py; shipped in har_ref/demo/checkpoints/ in transformers'
format, as a user's downloads are) and a synthetic HAR-like dataset (synthetic.py). Then it walks the
user's path, both families in parallel (one core each):

    weights_conversion hf  ->  zero-shot evaluate  ->  fine-tune (the study's protocol, scaled down)
    ->  evaluate  ->  WiSE-FT curve  ->  compare report

The numbers say the code works end to end, and how the pieces behave on tiny models and synthetic
images; they say nothing about real CLIP or SigLIP on real photos.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import time
from pathlib import Path

import torch

from ..eval.evaluate import evaluate
from ..eval.wise_ft import accuracy_curve
from ..train.config import TrainConfig
from ..train.loop import train
from ..train.optim import autocast, resolve_precision
from .synthetic import generate
from .tiny import CHECKPOINTS

FAMILIES = ("clip", "siglip")


def demo_dataset(out: Path, seed: int = 0) -> Path:
    """The demo's world: `generate`'s defaults, as `python -m har_ref synth --out OUT --seed SEED` writes it."""
    generate(out, seed=seed, overwrite=True)
    return out


def fine_tune_config(family: str, seed: int) -> TrainConfig:
    """The study's protocol scaled down, the same for both families: same-class positives, a cross-batch
    memory, accumulation, bf16 autocast where the CPU has it, and class-balanced micro-batches (why: docs/losses.md,
    "Where b starts"; the ablation behind the choice: docs/benchmarks.md).
    No augmentation: the synthetic figures sit at one place and size, and random crops move them."""
    return TrainConfig(model=family, epochs=6, micro_batch=64, accum_steps=2, accum_mode="cached", xbm_size=256,
                       xbm_warmup_steps=20, lr=1e-4, weight_decay=0.05, warmup_steps=5, grad_clip=1.0,
                       precision="auto", augment=False, balanced_batches=True, workers=0,
                       seed=seed, eval_batch=128, synthetic=True)


def run_family(family: str, data: Path, out: Path, seed: int) -> None:
    """One family's path, in its own process: one thread each, two families on two cores."""
    from weights_conversion.hf import convert_hf  # har_ref's own reader of transformers' format

    torch.set_num_threads(1)
    run = out / family
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "demo.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        cfg, cpu = fine_tune_config(family, seed), torch.device("cpu")
        precision = autocast(resolve_precision(cfg.precision, cpu), cpu)  # every score in the run's precision
        weights = convert_hf(CHECKPOINTS / family, out / "weights" / family)
        evaluate(weights, data, out / "zero_shot" / family, autocast=precision)
        train(cfg, weights, data, run, overwrite=True)  # a re-run replaces its run
        curve = accuracy_curve(weights, run, data, autocast=precision)
        (run / "wise_ft.json").write_text(json.dumps({"zero_shot": str(weights), "curve": curve}, indent=2) + "\n")


def watch(processes: dict[str, mp.Process], runs: dict[str, Path], start: float) -> None:
    """Print each run's epochs as its log.jsonl grows, until both processes end."""
    shown = dict.fromkeys(runs, 0)
    while any(p.is_alive() for p in processes.values()) or any(len(_epochs(runs[f])) > shown[f] for f in runs):
        for family, run in runs.items():
            for record in _epochs(run)[shown[family]:]:
                print(f"[demo] {family:6s} epoch {record['epoch']:2d}: loss {record['loss']:.3f}, "
                      f"{record['images_per_s']:.0f} img/s ({time.perf_counter() - start:.0f} s)", flush=True)
                shown[family] += 1
        time.sleep(1)
    for family, p in processes.items():
        if p.exitcode != 0:
            raise RuntimeError(f"demo: {family} failed; see {runs[family]}/demo.log")


def _epochs(run: Path) -> list[dict]:
    path = run / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def run_demo(out: str | Path = "runs/demo", seed: int = 0) -> Path:
    from ..eval.report import compare_runs

    out = Path(out)
    start = time.perf_counter()
    data = demo_dataset(out / "data", seed)
    print(f"[demo] synthetic dataset: {data} ({time.perf_counter() - start:.0f} s)", flush=True)
    runs = {family: out / family for family in FAMILIES}
    for run in runs.values():
        (run / "log.jsonl").unlink(missing_ok=True)
    print(f"[demo] from the shipped pretrained tiny checkpoints ({CHECKPOINTS}): convert, zero-shot, fine-tune, "
          f"WiSE-FT, both in parallel (logs: {runs['clip']}/demo.log, {runs['siglip']}/demo.log)", flush=True)
    context = mp.get_context("spawn")
    processes = {f: context.Process(target=run_family, args=(f, data, out, seed)) for f in FAMILIES}
    for p in processes.values():
        p.start()
    watch(processes, runs, start)
    report = compare_runs(runs["clip"], runs["siglip"], out / "report")
    for family in FAMILIES:
        zero = json.loads((out / "zero_shot" / family / "metrics.json").read_text())
        tuned = json.loads((runs[family] / "metrics.json").read_text())
        print(f"[demo] {family}: zero-shot accuracy {zero['accuracy']:.3f} / macro-F1 {zero['macro_f1']:.3f}, "
              f"fine-tuned {tuned['accuracy']:.3f} / {tuned['macro_f1']:.3f} (tiny model, synthetic data)")
    print(f"[demo] report: {report} (total {time.perf_counter() - start:.0f} s)")
    return report
