"""Atomic training checkpoints: RUN/checkpoint/{model.safetensors, config.json, trainer_state.pt}.

Weights are safetensors; the rest (optimizer, scheduler, GradScaler, cross-batch memory,
RNG states, counters) is a dict of tensors and numbers read back with weights_only=True,
so resuming never unpickles code. A checkpoint is written to `checkpoint.tmp/` and then
swapped in with renames, so a crash at any moment leaves either the old or the new
checkpoint complete. It is taken at the end of each epoch. Gradients of an optimizer step
still accumulating at that moment (an effective batch that spans epochs) are saved too, so
a resumed `independent` run continues that step exactly; in `cached` mode the step's
micro-batches (images) are not saved and a resumed run starts that step afresh.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from .model import load_state, save_model


def save_training_state(trainer) -> Path:
    run = trainer.out
    tmp, final, old = run / "checkpoint.tmp", run / "checkpoint", run / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(trainer.model, tmp)
    state = {
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "xbm": trainer.xbm.state_dict() if trainer.xbm is not None else None,
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "rng_python": list(random.getstate()[1]),
        # gradients accumulated towards the next optimizer step (None right after a step)
        "grads": {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None},
        "epoch": trainer.epoch, "step": trainer.step, "micro_step": trainer.micro_step,
    }
    torch.save(state, tmp / "trainer_state.pt")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run: Path) -> Path:
    for name in ("checkpoint", "checkpoint.old"):  # .old is complete if a crash hit the swap
        if (run / name / "trainer_state.pt").is_file() and (run / name / "model.safetensors").is_file():
            return run / name
    raise FileNotFoundError(f"--resume: no checkpoint in {run}; start without --resume or pass the run's --out.")


def load_training_state(trainer) -> None:
    ckpt = find_checkpoint(trainer.out)
    load_state(trainer.model, load_file(str(ckpt / "model.safetensors")), str(ckpt / "model.safetensors"))
    state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["scaler"])
    if trainer.xbm is not None and state["xbm"] is not None:
        trainer.xbm.load_state_dict(state["xbm"])
    torch.set_rng_state(state["rng_torch"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    random.setstate((3, tuple(state["rng_python"]), None))
    params = dict(trainer.model.named_parameters())
    for name, grad in state["grads"].items():
        params[name].grad = grad.to(params[name].device)
    trainer.epoch, trainer.step, trainer.micro_step = state["epoch"], state["step"], state["micro_step"]
    print(f"[train] resumed from {ckpt} at epoch {trainer.epoch}, optimizer step {trainer.step}")
