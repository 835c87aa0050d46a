"""Resumable training state, written so that a crash at any moment loses at most the work since the
last checkpoint, and the run directory rules that keep one run from overwriting another.

A checkpoint is RUN/checkpoint/: model.safetensors (+ config.json) and trainer_state.pt, a dict of
tensors and plain Python values read back with torch.load(weights_only=True), so resuming never
unpickles code. It holds everything the rest of the run depends on: optimizer, scheduler, GradScaler,
XBM contents, RNG states, the gradients of an optimizer step still accumulating (independent
mode) or the (epoch, index) keys of every rank's micro-batches (cached mode: the images are re-read), the
position inside the epoch, and the epoch's running loss statistics. With it, a resumed run ends
with the same weights, bit for bit on the CPU, as one that never stopped (tests/test_faults.py).

Writing: into checkpoint.tmp/, every file flushed and fsync'ed, then `checkpoint` is renamed to
`checkpoint.old`, `checkpoint.tmp` to `checkpoint`, and the old one removed. A kill at any point
leaves a complete `checkpoint` or (between the two renames) a complete `checkpoint.old`; a
half-removed `checkpoint.old` next to a complete `checkpoint` is removed by the next save.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from .. import distributed as dist
from ..data.folders import find_classes
from ..model.config import ModelConfig
from ..model.dual_encoder import DualEncoder, load_state, read_safetensors, save_model
from .config import TrainConfig
from .state import MicroBatch, TrainState

# Files a run writes into its directory (loop.py, eval/evaluate.py); --overwrite removes exactly these.
RUN_FILES = ("train_config.json", "log.jsonl", "classes.json", "prompts.json", "skipped.txt", "metrics.json",
             "predictions.csv", "confusion.png", "config.json", "model.safetensors", "checkpoint",
             "checkpoint.tmp", "checkpoint.old")
# Options that may differ between a run and its resume (--resume, --resume auto): they change how fast a run
# goes, how often it checkpoints and where it caches images, not what it computes.
RESUMABLE_CHANGES = ("workers", "eval_batch", "compile", "grad_checkpointing", "checkpoint_every",
                     "checkpoint_minutes", "max_nonfinite", "cache_dir")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(model: DualEncoder, state: TrainState, run: Path, pending: list | None = None,
         grads: dict[str, torch.Tensor] | None = None) -> Path:
    """Write RUN/checkpoint/ (the weights and `state`) so that a kill at any moment leaves one complete.
    `pending`: per rank, the (epoch, indices) keys of its micro-batches in `state.pending` (this
    process's own if None); under torchrun only rank 0 writes, so it is handed every rank's, and `grads`,
    the ranks' summed partial gradients (this process's own if None)."""
    tmp, final, old = run / "checkpoint.tmp", run / "checkpoint", run / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    saved = {
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "xbm": state.xbm.state_dict() if state.xbm is not None else None,
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "rng_python": list(random.getstate()[1]),
        # gradients accumulated towards the next optimizer step (None right after a step)
        "grads": grads if grads is not None else {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
        "pending": pending if pending is not None else [[(b.epoch, b.indices.tolist()) for b in state.pending]],
        "nonfinite": state.nonfinite.state_dict(),
        "epoch": state.epoch, "step": state.step, "micro_step": state.micro_step,
        "batch_in_epoch": state.batch_in_epoch, "epoch_losses": list(state.epoch_losses),
        "skipped_steps": state.skipped_steps,
    }
    torch.save(saved, tmp / "trainer_state.pt")
    for file in tmp.iterdir():
        _fsync(file)
    _fsync(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)  # left over if a kill cut the last clean-up short
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(run)  # the renames themselves reach the disk
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run: Path) -> Path:
    for name in ("checkpoint", "checkpoint.old"):  # .old is complete if a crash hit the swap
        if (run / name / "trainer_state.pt").is_file() and (run / name / "model.safetensors").is_file():
            return run / name
    raise FileNotFoundError(f"--resume: no checkpoint in {run}; start without --resume or pass the run's --out.")


def load(run: Path, model: DualEncoder, state: TrainState,
         reread: Callable[[int, list[int]], MicroBatch]) -> TrainState:
    """Restore the weights and `state` (built fresh for this run) from RUN's last checkpoint.
    `reread(epoch, indices)` rebuilds a pending cached-mode micro-batch from its keys."""
    ckpt = find_checkpoint(run)
    load_state(model, read_safetensors(ckpt / "model.safetensors"), str(ckpt / "model.safetensors"))
    try:
        saved = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
        state.optimizer.load_state_dict(saved["optimizer"])
    except pickle.UnpicklingError as e:  # weights_only=True met a class: code is never unpickled
        raise ValueError(f"{ckpt / 'trainer_state.pt'} cannot be read: it holds objects other than tensors and "
                         "plain values, which har_ref never unpickles; start the run again without --resume.") from e
    except Exception as e:  # a truncated file, or another optimizer's layout
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        raise ValueError(f"{ckpt / 'trainer_state.pt'} cannot be read ({reason}); it is damaged or from another "
                         "version of har_ref: start the run again without --resume.") from e
    state.scheduler.load_state_dict(saved["scheduler"])
    state.scaler.load_state_dict(saved["scaler"])
    if state.xbm is not None and saved["xbm"] is not None:
        state.xbm.load_state_dict(saved["xbm"])
    torch.set_rng_state(saved["rng_torch"])
    if saved["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng_cuda"])
    random.setstate((3, tuple(saved["rng_python"]), None))
    params = dict(model.named_parameters())
    if dist.rank() == 0:  # under torchrun the saved gradients are every rank's sum (loop.save_checkpoint)
        for name, grad in saved["grads"].items():
            params[name].grad = grad.to(params[name].device)
    if len(saved["pending"]) != dist.world_size():
        raise ValueError(f"{ckpt} was written by a run of {len(saved['pending'])} process(es); resume it with "
                         f"as many (torchrun --nproc_per_node), not {dist.world_size()}.")
    state.pending = [reread(epoch, indices) for epoch, indices in saved["pending"][dist.rank()]]
    state.nonfinite.load_state_dict(saved["nonfinite"])
    state.epoch, state.step, state.micro_step = saved["epoch"], saved["step"], saved["micro_step"]
    state.batch_in_epoch, state.epoch_losses = saved["batch_in_epoch"], list(saved["epoch_losses"])
    state.skipped_steps = saved["skipped_steps"]
    if dist.rank() == 0:  # one writer: two ranks replacing log.jsonl at once can fail
        truncate_log(run / "log.jsonl", state.epoch)
    print(f"[train] resumed from {ckpt} at epoch {state.epoch + 1}, micro-batch {state.batch_in_epoch}, "
          f"optimizer step {state.step}")
    return state


def truncate_log(log: Path, epochs_done: int) -> None:
    """Drop log lines of epochs the checkpoint does not include (written after it, before a crash)."""
    if not log.is_file():
        return
    kept = []
    for line in log.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] <= epochs_done:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by the kill
            pass
    tmp = log.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, log)


def refuse_weights_as_out(out: Path, weights: Path) -> None:
    if out.resolve() == weights.resolve():
        raise ValueError(f"--out {out} is the --weights directory; write the run to another directory.")


def prepare_run_directory(out: Path, weights: Path, cfg: TrainConfig, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one directory: a new run needs an empty (or run-free) OUT unless
    --overwrite; --resume needs a checkpoint and the same settings as the run it continues."""
    refuse_weights_as_out(out, weights)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pass one of them.")
    present = [name for name in RUN_FILES if (out / name).exists()]
    if resume:
        find_checkpoint(out)
        saved_path = out / "train_config.json"
        if saved_path.is_file():
            changed = changed_options(TrainConfig.load(saved_path), cfg)
            if changed:
                diffs = ", ".join(f"{k}: {there!r} -> {now!r}" for k, there, now in changed)
                raise ValueError(f"--resume: {out} was trained with other settings ({diffs}); pass the run's "
                                 "original flags, or start a new run in another --out.")
    elif present and not overwrite:
        raise ValueError(f"{out} already holds a run ({', '.join(present[:4])}); pass --resume to continue it, "
                         "--overwrite to replace it, or choose another --out.")
    elif present:
        for name in present:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()


def changed_options(saved: TrainConfig, now: TrainConfig) -> list[tuple[str, object, object]]:
    """(option, value in the run, value now) for every option that changes what the run computes, in
    TrainConfig's order; an option older runs did not record is read as its default (TrainConfig.load)."""
    return changed_values(asdict(saved), asdict(now))


def changed_values(there: dict, here: dict) -> list[tuple[str, object, object]]:
    """(key, value there, value here) for every key of either dict outside RESUMABLE_CHANGES whose values
    differ (a missing key reads as None), here's keys first, in their order."""
    keys = [*here, *(k for k in there if k not in here)]
    return [(k, there.get(k), here.get(k)) for k in keys
            if k not in RESUMABLE_CHANGES and there.get(k) != here.get(k)]


def auto_resume(out: Path, weights: Path, data: Path, cfg: TrainConfig) -> str:
    """--resume auto: what to do with OUT, so that running the same command again is always safe.

    "fresh"     OUT is absent or holds no run: start.
    "resume"    OUT holds a checkpoint of this run (same options, same towers, same classes): continue it.
    "restart"   OUT holds this run's first files but no checkpoint yet: start it again.
    "finished"  OUT holds this run, finished (its metrics written, the checkpoint at the last epoch): leave it.
    A run of other options is refused with ValueError, naming the first option that differs."""
    refuse_weights_as_out(out, weights)
    if not [name for name in RUN_FILES if (out / name).exists()]:
        return "fresh"
    if not (out / "train_config.json").is_file():
        raise ValueError(f"--resume auto: {out} holds files of a run but no train_config.json, so its options "
                         "are unknown; pass another --out, or --overwrite to replace that run.")
    changed = changed_options(TrainConfig.load(out / "train_config.json"), cfg)
    difference = (f"--{changed[0][0].replace('_', '-')} {changed[0][1]!r} there, {changed[0][2]!r} now" if changed
                  else other_inputs(out, weights, data))
    if difference:
        raise ValueError(f"--resume auto: {out} holds a run of other options ({difference}); pass that run's "
                         "options, another --out, or --overwrite to replace it.")
    try:
        ckpt = find_checkpoint(out)
    except FileNotFoundError:
        ckpt = None
    metrics = ["metrics.json"] + (["metrics_shift.json"] if cfg.shift_split and (data / cfg.shift_split).is_dir()
                                  else [])
    if all((out / name).is_file() for name in metrics + ["model.safetensors"]):  # evaluation writes metrics last
        epochs_done = 0 if ckpt is None else torch.load(ckpt / "trainer_state.pt", map_location="cpu",
                                                        weights_only=True, mmap=True)["epoch"]
        if epochs_done == cfg.epochs:
            return "finished"
    return "restart" if ckpt is None else "resume"


def other_inputs(out: Path, weights: Path, data: Path) -> str:
    """How --weights and --data differ from the run's, as far as the run directory records them: the towers
    (its config.json's architecture) and the classes (its classes.json); "" when they agree."""
    recorded = next((d for d in (out / "checkpoint", out / "checkpoint.old", out) if (d / "config.json").is_file()),
                    None)
    if recorded is not None and ModelConfig.load(recorded).architecture() != ModelConfig.load(weights).architecture():
        return f"--weights {weights} has other towers than {recorded}/config.json"
    if (out / "classes.json").is_file() and (data / "train").is_dir():
        if json.loads((out / "classes.json").read_text()) != find_classes(data / "train"):
            return f"--data {data}/train holds other classes than {out}/classes.json"
    return ""
