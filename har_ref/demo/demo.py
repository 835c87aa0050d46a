"""`make demo`: the study in miniature, offline, in a few minutes on two CPU cores.

The study fine-tunes pretrained CLIP and SigLIP and compares them. No pretrained weights or datasets
can be downloaded here, so the demo brings its own: tiny CLIP and SigLIP pretrained by the project on
synthetic image-caption pairs (pretrain.py; shipped in har_ref/demo/checkpoints/ in transformers'
format, as a user's downloads are) and a synthetic HAR-like world (synthetic.py) with a test split in
the training style (ID) and a shifted one (test_shift/) in a style fine-tuning never sees. Then it walks
the user's path, both families in parallel (one core each):

    weights_conversion hf  ->  zero-shot evaluate  ->  linear probe  ->  fine-tune, one run per seed
    (the study's protocol, scaled down)  ->  seed 0's WiSE-FT curve and its mix at the alpha chosen on
    validation  ->  summary.json and the comparison report

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
from ..eval.linear_probe import linear_probe
from ..eval.multi_seed import verdict
from ..eval.wise_ft import accuracy_curve, best_alpha, wise_ft
from ..train.config import TrainConfig
from ..train.loop import train
from ..train.optim import autocast, resolve_precision
from .summary import ROWS, markdown, summarize
from .synthetic import generate
from .tiny import CHECKPOINTS

FAMILIES = ("clip", "siglip")
SEEDS = 3  # fine-tunes per family (seeds seed, seed + 1, ...): the report shows their mean, sd and each value
WISE_FT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # five mixes on three splits: the curve's cost within the time
VAL_FRACTION = 0.2  # of train, held out of fine-tuning: WiSE-FT's alpha is chosen on it (never on test)


def demo_dataset(out: Path, seed: int = 0) -> Path:
    """The demo's world: `generate`'s defaults, as `python -m har_ref synth --out OUT --seed SEED` writes it."""
    generate(out, seed=seed, overwrite=True)
    return out


def fine_tune_config(family: str, seed: int) -> TrainConfig:
    """The study's protocol scaled down, the same for both families: same-class positives, a cross-batch
    memory, accumulation, bf16 autocast where the CPU has it, and class-balanced micro-batches (why: docs/losses.md,
    "Where b starts"; the ablation behind the choice: docs/benchmarks.md). No augmentation: the world's
    own variation (place, size, pose, clothes, light) is what the models must learn to see through.
    3 epochs keep three seeds per family within the demo's five minutes on two cores."""
    return TrainConfig(model=family, epochs=3, micro_batch=64, accum_steps=2, accum_mode="cached", xbm_size=256,
                       xbm_warmup_steps=20, lr=1e-4, weight_decay=0.05, warmup_steps=5, grad_clip=1.0,
                       precision="auto", augment=False, balanced_batches=True, workers=0,
                       seed=seed, eval_batch=128, val_fraction=VAL_FRACTION, synthetic=True)


def run_family(family: str, data: Path, out: Path, seeds: tuple[int, ...]) -> None:
    """One family's path, in its own process (one thread; the two families run on two cores): convert,
    zero-shot, linear probe, a fine-tune per seed, seed 0's WiSE-FT curve and its best mix. Every
    number is scored in the precision the fine-tuning trains in, so a 0-epoch fine-tune is zero-shot."""
    from weights_conversion.hf import convert_hf  # har_ref's own reader of transformers' format

    torch.set_num_threads(1)
    (out / family).mkdir(parents=True, exist_ok=True)
    with open(out / family / "demo.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        cpu = torch.device("cpu")
        precision = autocast(resolve_precision(fine_tune_config(family, 0).precision, cpu), cpu)
        weights = convert_hf(CHECKPOINTS / family, out / "weights" / family)
        evaluate(weights, data, out / "zero_shot" / family, autocast=precision)
        linear_probe(weights, data, out / "linear_probe" / family, autocast=precision)
        for seed in seeds:  # a re-run replaces its runs
            train(fine_tune_config(family, seed), weights, data, out / family / f"seed{seed}", overwrite=True)
        run = out / family / f"seed{seeds[0]}"
        curve = accuracy_curve(weights, run, data, WISE_FT_ALPHAS, autocast=precision)
        (run / "wise_ft_curve.json").write_text(json.dumps({"zero_shot": str(weights), "curve": curve}, indent=2) + "\n")
        mix = wise_ft(weights, run, best_alpha(curve), out / "wise_ft" / family)  # alpha from validation, not test
        evaluate(mix, data, mix, autocast=precision)


def watch(processes: dict[str, mp.Process], out: Path, start: float) -> None:
    """Print each fine-tune's epochs as its log.jsonl grows, until both processes end."""
    shown: dict[Path, int] = {}
    while True:
        alive = any(p.is_alive() for p in processes.values())
        for log in sorted(out.glob("*/seed*/log.jsonl")):
            records = _epochs(log)
            for record in records[shown.get(log, 0):]:
                print(f"[demo] {log.parent.parent.name:6s} {log.parent.name} epoch {record['epoch']:2d}: "
                      f"loss {record['loss']:.3f}, {record['images_per_s']:.0f} img/s "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
            shown[log] = len(records)
        if not alive:
            break
        time.sleep(1)
    for family, p in processes.items():
        if p.exitcode != 0:
            raise RuntimeError(f"demo: {family} failed; see {out / family}/demo.log")


def _epochs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def run_demo(out: str | Path = "runs/demo", seed: int = 0) -> Path:
    """`make demo`: the world, both families' paths in parallel, the report and summary.json."""
    from ..eval.report import compare_runs
    from ..eval.report_maps import ExplainInputs

    out = Path(out)
    start = time.perf_counter()
    data = demo_dataset(out / "data", seed)
    print(f"[demo] synthetic world: {data} (train/, test/, test_shift/; {time.perf_counter() - start:.0f} s)",
          flush=True)
    for log in out.glob("*/seed*/log.jsonl"):
        log.unlink()
    seeds = tuple(seed + k for k in range(SEEDS))
    print(f"[demo] from the shipped pretrained tiny checkpoints ({CHECKPOINTS}): convert, zero-shot, linear probe, "
          f"fine-tune (seeds {', '.join(map(str, seeds))}), WiSE-FT; both families in parallel "
          f"(logs: {out}/clip/demo.log, {out}/siglip/demo.log)", flush=True)
    context = mp.get_context("spawn")
    processes = {f: context.Process(target=run_family, args=(f, data, out, seeds)) for f in FAMILIES}
    for p in processes.values():
        p.start()
    watch(processes, out, start)
    precision = resolve_precision(fine_tune_config("clip", seed).precision, torch.device("cpu"))
    summary = summarize(out, seeds, time.perf_counter() - start, precision)
    looks = ExplainInputs(data, zero_shot={f: out / "weights" / f for f in FAMILIES})  # maps from seed 0's runs
    report = compare_runs(out / "clip" / f"seed{seeds[0]}", out / "siglip" / f"seed{seeds[0]}", out / "report",
                          lead=markdown(summary, seeds), explain=looks)
    summary["wall_seconds"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for family, rows in summary["families"].items():
        print(f"[demo] {family} macro-F1, ID / shift [95% CI] (tiny model, synthetic data):")
        for key, label in ROWS:
            e = rows[key]
            print(f"[demo]   {label:13s} {e['id']['macro_f1']:.3f} [{e['id']['ci95'][0]:.3f}, {e['id']['ci95'][1]:.3f}]"
                  f" / {e['shift']['macro_f1']:.3f} [{e['shift']['ci95'][0]:.3f}, {e['shift']['ci95'][1]:.3f}]")
    for split, d in summary["siglip_minus_clip"]["fine_tuned"].items():
        print(f"[demo] {split}: {verdict('SigLIP - CLIP', d)}")
    print(f"[demo] report: {report}, summary: {out / 'summary.json'} (total {summary['wall_seconds']:.0f} s, "
          f"{precision} on {summary['cpu']})")
    return report
