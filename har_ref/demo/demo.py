"""`make demo`: the whole pipeline offline, in a few minutes on two CPU cores.

No pretrained weights or datasets exist offline, so the demo makes its own: a synthetic
HAR-like dataset (synthetic.py), a CLIP BPE and a SigLIP SentencePiece tokenizer trained on
the prompt bank, and TINY CLIP and SigLIP models with random weights. Both are trained from
scratch with the same loop and protocol switches as real fine-tuning, evaluated, and
compared in a report. The numbers say the code works end to end; they say nothing about
real CLIP or SigLIP.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import time
from pathlib import Path

import torch

from ..model.config import ModelConfig, TextConfig, VisionConfig
from ..data.prompts import PromptBank
from ..model.dual_encoder import DualEncoder, save_model
from .synthetic import CLASS_NAMES, generate
from ..model.tokenizer import ClipTokenizer, SiglipTokenizer
from .tokenizer_training import train_clip_bpe, train_sentencepiece
from ..train.loop import train
from ..train.config import TrainConfig

IMAGE_SIZE = 64  # synthetic images are drawn at this size; both tiny ViTs take it as is
TRAIN_PER_CLASS, TEST_PER_CLASS, EPOCHS = 200, 40, 14
VARIATION = 0.0  # synthetic.render fixes figure placement and clothes colours: learnable by a tiny ViT in minutes


def tiny_config(family: str, tok: dict) -> ModelConfig:
    """A ~0.3 M parameter dual encoder with each family's real architecture switches."""
    clip = family == "clip"
    width = 64
    return ModelConfig(
        family=family, embed_dim=64 if clip else width,
        vision=VisionConfig(image_size=IMAGE_SIZE, patch_size=8, width=width, layers=3, heads=4, mlp_dim=4 * width,
                            act="quick_gelu" if clip else "gelu_tanh", ln_eps=1e-5 if clip else 1e-6,
                            pool="cls" if clip else "map", patch_bias=not clip),
        text=TextConfig(vocab_size=tok["vocab_size"], context_length=tok["context_length"], width=width, layers=2, heads=4,
                        mlp_dim=4 * width, act="quick_gelu" if clip else "gelu_tanh",
                        ln_eps=1e-5 if clip else 1e-6, causal=clip, pool="eos" if clip else "last",
                        eos_token_id=tok["eos_token_id"], eos_by_argmax=clip, pad_token_id=tok["pad_token_id"],
                        proj_bias=not clip),
        logit_scale_init=2.6592 if clip else 2.302585092994046,
        logit_bias_init=None if clip else -10.0,  # SigLIP sec. 3.2: t = log 10, b = -10
        image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
        resize="shortest_edge" if clip else "square")


def make_tiny_checkpoint(family: str, texts: list[str], out: Path, seed: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if family == "clip":
        tok = train_clip_bpe(texts, out, vocab_size=1000)
        lengths = ClipTokenizer(out, context_length=512)(texts)[1].sum(1)
    else:
        tok = train_sentencepiece(texts, out, vocab_size=400)
        lengths = SiglipTokenizer(out, context_length=512)(texts)[1].sum(1)
    # every prompt fits; SigLIP then pads the rest, as it was trained
    tok["context_length"] = int(lengths.max()) + (0 if family == "clip" else 4)
    torch.manual_seed(seed)
    save_model(DualEncoder(tiny_config(family, tok)), out)
    return out


def demo_train_config(family: str, seed: int) -> TrainConfig:
    # Trained from scratch, so a far larger lr than fine-tuning; both models get the same budget.
    # The memory joins once the embeddings have left their random start (XBM paper sec. 4.1).
    return TrainConfig(model=family, epochs=EPOCHS, micro_batch=64, accum_steps=1, xbm_size=256,
                       xbm_warmup_steps=200, lr=2e-3, weight_decay=0.05, warmup_steps=50, grad_clip=1.0,
                       precision="fp32", augment=True, workers=0, seed=seed, eval_batch=128, synthetic=True)


def train_one(family: str, data: Path, out: Path, seed: int) -> None:
    """One model's training, in its own process: one thread each, two models on two cores."""
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        texts, _ = PromptBank.from_file(None, list(CLASS_NAMES)).all_prompts()
        weights = make_tiny_checkpoint(family, texts, out.parent / "weights" / family, seed)
        train(demo_train_config(family, seed), weights, data, out, overwrite=True)  # a demo re-run replaces its runs


def watch(processes: dict[str, mp.Process], runs: dict[str, Path], start: float) -> None:
    """Print each run's epochs as its log.jsonl grows, until both processes end."""
    shown = dict.fromkeys(runs, 0)
    while any(p.is_alive() for p in processes.values()) or any(
            len(_epochs(runs[f])) > shown[f] for f in runs):
        for family, run in runs.items():
            for record in _epochs(run)[shown[family]:]:
                print(f"[demo] {family:6s} epoch {record['epoch']:2d}: loss {record['loss']:.3f}, "
                      f"{record['images_per_s']:.0f} img/s ({time.perf_counter() - start:.0f} s)", flush=True)
                shown[family] += 1
        time.sleep(1)
    for family, p in processes.items():
        if p.exitcode != 0:
            raise RuntimeError(f"demo: training {family} failed; see {runs[family]}/train.log")


def _epochs(run: Path) -> list[dict]:
    path = run / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def run_demo(out: str | Path = "runs/demo", seed: int = 0) -> Path:
    from ..eval.report import compare_runs

    out = Path(out)
    start = time.perf_counter()
    data = out / "data"
    generate(data, train_per_class=TRAIN_PER_CLASS, test_per_class=TEST_PER_CLASS, image_size=IMAGE_SIZE,
             seed=seed, variation=VARIATION, overwrite=True)
    print(f"[demo] synthetic dataset: {data} ({time.perf_counter() - start:.0f} s)", flush=True)
    runs = {family: out / family for family in ("clip", "siglip")}
    for run in runs.values():
        (run / "log.jsonl").unlink(missing_ok=True)
    print("[demo] training tiny CLIP and SigLIP from scratch, in parallel (logs: "
          f"{runs['clip']}/train.log, {runs['siglip']}/train.log)", flush=True)
    context = mp.get_context("spawn")
    processes = {f: context.Process(target=train_one, args=(f, data, run, seed)) for f, run in runs.items()}
    for p in processes.values():
        p.start()
    watch(processes, runs, start)
    report = compare_runs(runs["clip"], runs["siglip"], out / "report")
    for family, run in runs.items():
        m = json.loads((run / "metrics.json").read_text())
        print(f"[demo] {family}: test accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f} "
              "(tiny model trained from scratch on synthetic data)")
    print(f"[demo] report: {report} (total {time.perf_counter() - start:.0f} s)")
    return report
