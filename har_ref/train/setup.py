"""Building a run: the model, its data and prompts, the loss (--loss, the preset's by default), the optimizer.

`setup` returns the fixed parts of a run (a `Run`) and a fresh or resumed `TrainState` (state.py);
loop.py then trains with them. Also here: the files a new run writes before its first step.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .. import distributed as dist
from ..data.folders import (ImageFolderDataset, build_splits, hold_out, make_train_loader, non_image_files,
                            random_labels, write_items, write_skipped)
from ..data.image_cache import CachedImageDataset
from ..data.prompts import DEFAULT_PROMPTS, PromptBank, PromptSampler
from ..model.config import SIGLIP_LOGIT_BIAS_INIT
from ..model.dual_encoder import DualEncoder, load_model
from ..model.tokenizer import load_tokenizer
from ..model.transforms import build_transform
from . import checkpoint
from .config import TrainConfig
from .faults import NonFiniteLosses, StopRequest
from .losses import balanced_pos_weight, clip_loss, logit_bias_for, positive_share, siglip_loss
from .optim import build_optimizer, grad_scaler, resolve_precision, warmup_cosine
from .state import MicroBatch, Run, TrainState
from .xbm import CrossBatchMemory


class EmbedBoth(nn.Module):
    """The unit DDP wraps (DDP hooks forward() only): both towers plus the loss parameters."""

    def __init__(self, model: DualEncoder):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor):
        # No attention mask: SigLIP was trained attending to its padding, and CLIP's causal
        # tower pools before any padding (see eval/embed.py).
        return self.model.encode_image(pixels), self.model.encode_text(input_ids)


def choose_loss(cfg: TrainConfig, model: DualEncoder):
    """The run's loss (--loss, whatever the towers) with its settings bound, once:
    (image, text, labels, gathered, memory) -> loss. `gathered` and `memory` are (images, texts, labels)
    triples or None: this step's rows from other ranks and micro-batches, and the cross-batch memory's
    (losses.py says what each is)."""
    if cfg.loss == "clip":  # InfoNCE has no b: a softmax is the same for every b (SigLIP towers keep theirs unused)
        return lambda image, text, labels, gathered, memory: clip_loss(image, text, model.logit_scale, labels,
                                                                       gathered, memory)
    fixed = None if cfg.pos_weight in ("none", "balanced") else float(cfg.pos_weight)

    def loss(image, text, labels, gathered, memory):
        extra_labels = [rows[2] for rows in (gathered, memory) if rows is not None]
        pos_weight = balanced_pos_weight(labels, *extra_labels) if cfg.pos_weight == "balanced" else fixed
        return siglip_loss(image, text, model.logit_scale, model.logit_bias, labels, pos_weight, gathered, memory)
    return loss


def setup(cfg: TrainConfig, weights: Path, data: Path, out: Path, resume: bool, overwrite: bool
          ) -> tuple[Run, TrainState]:
    cfg.validate()
    device = dist.setup_distributed()
    main = dist.is_main_process()
    if main:  # before anything slow: a mistaken --out is refused at once
        checkpoint.prepare_run_directory(out, weights, cfg, resume, overwrite)
    dist.barrier()
    torch.manual_seed(cfg.seed + dist.rank())
    random.seed(cfg.seed)
    model = load_model(weights, device=device).train()
    if model.cfg.family != cfg.model:
        raise ValueError(f"--model {cfg.model} but {weights}/config.json is a {model.cfg.family} "
                         f"checkpoint; pass --model {model.cfg.family} or the other weights.")
    loss_parameters(cfg, model)
    lock_tower(cfg, model)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    tokenizer = load_tokenizer(weights)
    train_items, _, class_names = build_splits(data)
    train_items, validation_items = hold_out(train_items, cfg.val_fraction)  # same images for every --seed
    if cfg.shuffle_labels:
        train_items = random_labels(train_items, len(class_names), cfg.seed)
    dataset = build_dataset(cfg, model, train_items, main)
    loader = make_train_loader(dataset, cfg.micro_batch, cfg.workers, cfg.seed, balanced=cfg.balanced_batches)
    if cfg.loss == "siglip" and cfg.logit_bias_init != "checkpoint":  # before DDP copies rank 0's b
        with torch.no_grad():
            model.logit_bias.fill_(initial_logit_bias(cfg.logit_bias_init, loader))
    prompts = PromptSampler(PromptBank.from_file(cfg.prompts, class_names), class_names, tokenizer, device, cfg.seed)
    precision = resolve_precision(cfg.precision, device)
    embed = EmbedBoth(model)
    if dist.is_distributed():
        embed = DistributedDataParallel(embed)
    if cfg.compile:  # compiles EmbedBoth.forward, i.e. both towers (compiling the model would only cover logits)
        embed = torch.compile(embed)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    total_steps = max(1, int(len(loader) / cfg.accum_steps * cfg.epochs))
    state = TrainState(
        optimizer=optimizer, scheduler=warmup_cosine(optimizer, cfg.warmup_steps, total_steps),
        scaler=grad_scaler(precision, device),
        xbm=CrossBatchMemory(cfg.xbm_size, model.cfg.embed_dim, cfg.xbm_warmup_steps, device) if cfg.xbm_size else None,
        nonfinite=NonFiniteLosses(cfg.max_nonfinite))
    run = Run(cfg=cfg, out=out, weights=weights, data=data, device=device, precision=precision, model=model,
              embed=embed, tokenizer=tokenizer, class_names=class_names, dataset=dataset, loader=loader,
              prompts=prompts, loss=choose_loss(cfg, model), total_steps=total_steps, main=main, stop=StopRequest())
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        checkpoint.load(out, model, state, lambda epoch, indices: reread_micro_batch(run, epoch, indices))
    elif main:  # a resumed run keeps the files its first start wrote; the options first (--resume auto reads them)
        cfg.save(out / "train_config.json")
        (out / "log.jsonl").write_text("")
        save_label_space(run)
        if validation_items:  # WiSE-FT chooses alpha on these (eval/wise_ft.py), never on test
            write_items(out / "validation.csv", validation_items, class_names)
    if main:
        explain_batch(run)
    return run, state


def loss_parameters(cfg: TrainConfig, model: DualEncoder) -> None:
    """t and b as the loss needs them, and the loss recorded in the model's config.json (save_model), which
    every reader of the run follows. CLIP towers under the sigmoid loss get a learnable b: at
    --logit-bias-init, or SigLIP's -10 for "checkpoint" (a CLIP checkpoint holds no b). SigLIP towers under
    InfoNCE keep their b untrained (no gradient, no optimizer state): the loss does not see it."""
    if cfg.loss == "siglip" and model.logit_bias is None:
        if cfg.logit_bias_init == "checkpoint" and dist.is_main_process():
            print(f"[train] the sigmoid loss on CLIP towers: b starts at SigLIP's {SIGLIP_LOGIT_BIAS_INIT:g} "
                  "(the checkpoint holds no b; --logit-bias-init sets another start)")
        model.add_logit_bias(SIGLIP_LOGIT_BIAS_INIT)  # "auto" or a number overwrite it once the loader exists
    if cfg.loss == "clip" and model.logit_bias is not None:
        model.logit_bias.requires_grad_(False)
    model.cfg = replace(model.cfg, loss=cfg.loss)


def lock_tower(cfg: TrainConfig, model: DualEncoder) -> None:
    """--lock: the tower keeps its pretrained weights (LiT, Zhai et al. 2022, locks the image tower). Without
    requires_grad its parameters get no gradient and no optimizer state (optim.py::param_groups skips them);
    loop.py::train_mode keeps the tower in eval mode."""
    if cfg.lock:
        locked_tower(model, cfg.lock).requires_grad_(False)


def locked_tower(model: DualEncoder, lock: str) -> nn.Module:
    return model.vision if lock == "image" else model.text


def initial_logit_bias(setting: str, loader) -> float:
    """--logit-bias-init: a number as given, or "auto": the logit of the share of positive pairs in
    epoch 0's micro-batches (same-class positives), so that b starts where the loss wants the common
    level of every logit (docs/losses.md, "Where b starts")."""
    if setting != "auto":
        return float(setting)
    loader.sampler.set_epoch(0)
    labels = [loader.dataset.items[i][1] for _, i in loader.sampler]
    B = loader.batch_size
    return logit_bias_for(positive_share([labels[s:s + B] for s in range(0, len(labels) - B + 1, B)]))


def build_dataset(cfg: TrainConfig, model: DualEncoder, items, main: bool):
    """Decoded from the image files every epoch, or read from the preprocessed uint8 cache."""
    if cfg.cache_dir is None:
        return ImageFolderDataset(items, build_transform(model.cfg, train=True, augment=cfg.augment), seed=cfg.seed)
    if not main:  # rank 0 builds the cache, the others read the finished one
        dist.barrier()
    dataset = CachedImageDataset(items, model.cfg, cfg.cache_dir, augment=cfg.augment, seed=cfg.seed)
    if main:
        dist.barrier()
    return dataset


def reread_micro_batch(run: Run, epoch: int, indices: list[int]) -> MicroBatch:
    """A cached-mode micro-batch rebuilt from its (epoch, index) keys (resume): the same pixels,
    labels and prompts as the loader gave, because all three depend on those keys only."""
    items = [run.dataset[(epoch, i)] for i in indices]
    pixels = torch.stack([x for x, _, _ in items]).to(run.device)
    labels = torch.tensor([y for _, y, _ in items]).to(run.device)
    indices = torch.tensor(indices)
    return MicroBatch(pixels, run.prompts.sample(labels, indices, epoch, len(run.dataset)), labels, epoch, indices)


def explain_batch(run: Run) -> None:
    cfg = run.cfg
    n = len(run.dataset)  # every rank holds the whole training set (its sampler draws the rank's share)
    eff = cfg.effective_batch * dist.world_size()
    locked = f"; {cfg.lock} tower locked" if cfg.lock else ""
    print(f"[train] {run.model.cfg.name}{locked}: {n} training images, {len(run.class_names)} classes, "
          f"micro-batch {cfg.micro_batch} x accum {cfg.accum_steps} x {dist.world_size()} rank(s) "
          f"= effective batch {eff}; XBM {cfg.xbm_size}; precision {run.precision}; "
          f"{run.total_steps} optimizer step(s) over {cfg.epochs} epoch(s)")
    if eff > n:
        print(f"[train] note: the effective batch ({eff}) exceeds the training set ({n} images): one "
              f"optimizer step spans {eff / n:.1f} epochs, so {cfg.epochs} epochs make only "
              f"{run.total_steps} step(s). Lower --accum-steps for more updates.")
    skipped = getattr(run.dataset, "skipped", [])
    for path, reason in skipped:
        print(f"[train] skipped unreadable image {path}: {reason}")
    ignored = non_image_files(run.data)
    if skipped or ignored:
        write_skipped(run.out, "train", skipped + ignored)
        print(f"[train] {len(skipped)} unreadable image(s) skipped, {len(ignored)} non-image file(s) "
              f"ignored: listed in {run.out}/skipped.txt")


def save_label_space(run: Run) -> None:
    """classes.json and prompts.json make the run directory self-describing: `predict` and
    `evaluate` on it use the classes and template bank it was trained with."""
    (run.out / "classes.json").write_text(json.dumps(run.class_names, indent=2) + "\n")
    source = Path(run.cfg.prompts) if run.cfg.prompts else DEFAULT_PROMPTS
    if source.resolve() != (run.out / "prompts.json").resolve():
        shutil.copy(source, run.out / "prompts.json")
