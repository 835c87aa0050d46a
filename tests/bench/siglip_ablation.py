"""Which changes let the sigmoid loss learn with same-class positives (docs/losses.md, "Where b starts").

Fine-tunes the demo's tiny models on the demo's synthetic data (200 train / 40 test images per class,
seed 0), one setting at a time, two runs in parallel on one thread each, and prints a markdown table
of test accuracy and macro-F1. Starts: from scratch (random weights, the demo's tiny architecture,
`make_tiny_checkpoint`) and from the shipped pretrained checkpoints (`make pretrain`). Run from the
repository root (about 15 minutes on 2 cores):

    .venv/bin/python tests/bench/siglip_ablation.py --out runs/ablation
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import sys
from dataclasses import replace
from pathlib import Path

import torch

from har_ref.data.classes import CLASS_NAMES
from har_ref.data.prompts import PromptBank
from har_ref.demo.demo import demo_dataset, fine_tune_config
from har_ref.demo.tiny import CHECKPOINTS
from har_ref.train.loop import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers the benchmarks share with the tests
from tiny_checkpoint import make_tiny_checkpoint  # noqa: E402

# (start, family, changes): the from-scratch runs use the old demo's schedule (14 epochs at lr 2e-3, the
# memory after 200 steps), the pretrained ones the demo's fine-tuning protocol.
SCRATCH = dict(epochs=14, lr=2e-3, warmup_steps=50, xbm_warmup_steps=200, accum_steps=1, accum_mode="independent",
               precision="fp32", augment=True)
SETTINGS = [(start, family, changes) for start in ("scratch", "pretrained") for family in ("siglip", "clip")
            for changes in ({"balanced_batches": False, "logit_bias_init": "checkpoint"},
                            {"balanced_batches": False, "logit_bias_init": "auto"},
                            {"balanced_batches": True, "logit_bias_init": "checkpoint"},
                            {"balanced_batches": True, "logit_bias_init": "auto"})
            if family == "siglip" or changes["logit_bias_init"] == "checkpoint"]


def run_one(start: str, family: str, changes: dict, data: Path, out: Path, queue) -> None:
    torch.set_num_threads(1)
    name = f"{start}-{family}-{'balanced' if changes['balanced_batches'] else 'random'}-{changes['logit_bias_init']}"
    with open(out / f"{name}.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        if start == "scratch":
            texts, _ = PromptBank.from_file(None, list(CLASS_NAMES)).all_prompts()
            weights = make_tiny_checkpoint(family, texts, out / "weights" / name, seed=0)
        else:
            from weights_conversion.hf import convert_hf
            weights = convert_hf(CHECKPOINTS / family, out / "weights" / name)
        cfg = replace(fine_tune_config(family, seed=0), **changes, **(SCRATCH if start == "scratch" else {}))
        metrics = train(cfg, weights, data, out / name, overwrite=True)
    queue.put({"start": start, "family": family, **changes, "accuracy": metrics["accuracy"],
               "macro_f1": metrics["macro_f1"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/ablation")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    data = demo_dataset(out / "data")
    context = mp.get_context("spawn")
    queue, results = context.Queue(), []
    for pair in range(0, len(SETTINGS), 2):  # two at a time, one core each
        processes = [context.Process(target=run_one, args=(*s, data, out, queue)) for s in SETTINGS[pair:pair + 2]]
        for p in processes:
            p.start()
        results += [queue.get() for _ in processes]
        for p in processes:
            p.join()
    (out / "ablation.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| start | family | batches | b starts at | accuracy | macro-F1 |\n|---|---|---|---|---|---|")
    for r in sorted(results, key=lambda r: (r["start"] != "scratch", r["family"] != "siglip")):
        print(f"| {r['start']} | {r['family']} | {'balanced' if r['balanced_batches'] else 'random'} | "
              f"{r['logit_bias_init'] if r['family'] == 'siglip' else '-'} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} |")


if __name__ == "__main__":
    main()
