"""End-to-end contrastive fine-tuning of a DualEncoder on HAR folders (study sec. 3).

One step: sample a prompt per image from the template bank, embed both, score every image
against every prompt of the batch (+ other ranks' rows under DDP, + the cross-batch
memory), and descend on CLIP's InfoNCE or SigLIP's sigmoid loss. Same-class pairs are
positives (losses.py). Gradient accumulation has two modes:

- independent: each micro-batch is its own contrastive problem (its batch + XBM);
  gradients are summed over `accum_steps` micro-batches before the optimizer step.
- cached (GradCache, Gao et al. 2021; open_clip --accum-freq): the whole effective batch
  is one contrastive problem. Embed every micro-batch without grad, take the loss
  gradient w.r.t. the embeddings, then re-run each micro-batch with grad and backpropagate
  those embedding gradients. Exact large-batch gradients at one micro-batch's activation memory.

A run is checkpointed at epoch ends, by time and by micro-batch count (checkpoint.py), stops
cleanly on Ctrl-C / SIGTERM, and skips non-finite steps (faults.py); everything a micro-batch
depends on is a function of (seed, epoch, index), so a resumed run continues bit for bit.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .. import distributed as dist
from .checkpoint import load_training_state, prepare_run_directory, save_training_state
from ..data.folders import ImageFolderDataset, build_splits, make_train_loader, non_image_files, write_skipped
from ..data.prompts import DEFAULT_PROMPTS, PromptBank, PromptSampler
from .faults import NonFiniteLosses, StopRequest, TrainingStopped
from ..eval.evaluate import evaluate_model
from ..data.image_cache import CachedImageDataset
from .losses import balanced_pos_weight, clamp_logit_scale_, clip_loss, siglip_loss
from ..model.dual_encoder import DualEncoder, load_model, save_model
from .optim import autocast, build_optimizer, grad_scaler, resolve_precision, warmup_cosine
from ..model.tokenizer import load_tokenizer
from .config import TrainConfig
from ..model.transforms import build_transform
from .xbm import CrossBatchMemory

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "spiece.model", "tokenizer_config.json",
                   "special_tokens_map.json")


class EmbedBoth(nn.Module):
    """The unit DDP wraps (DDP hooks forward() only): both towers plus the loss parameters."""

    def __init__(self, model: DualEncoder):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor):
        # No attention mask: SigLIP was trained attending to its padding, and CLIP's causal
        # tower pools before any padding (see embed.class_embeddings).
        return self.model.encode_image(pixels), self.model.encode_text(input_ids)


class Trainer:
    def __init__(self, cfg: TrainConfig, weights: str | Path, data: str | Path, out: str | Path,
                 resume: bool = False, overwrite: bool = False):
        cfg.validate()
        self.cfg, self.weights, self.data, self.out = cfg, Path(weights), Path(data), Path(out)
        self.resume = resume
        self.device = dist.setup_distributed()
        self.main = dist.is_main_process()
        if self.main:  # before anything slow: a mistaken --out is refused at once
            prepare_run_directory(self.out, self.weights, cfg, resume, overwrite)
        dist.barrier()
        torch.manual_seed(cfg.seed + dist.rank())
        random.seed(cfg.seed)
        self.model = load_model(self.weights, device=self.device).train()
        if self.model.cfg.family != cfg.model:
            raise ValueError(f"--model {cfg.model} but {self.weights}/config.json is a {self.model.cfg.family} "
                             f"checkpoint; pass --model {self.model.cfg.family} or the other weights.")
        self.model.set_grad_checkpointing(cfg.grad_checkpointing)
        self.tokenizer = load_tokenizer(self.weights)
        train_items, _, self.class_names = build_splits(self.data)
        self.dataset = self.build_dataset(train_items)
        self.loader = make_train_loader(self.dataset, cfg.micro_batch, cfg.workers, cfg.seed)
        self.prompts = PromptSampler(PromptBank.from_file(cfg.prompts, self.class_names), self.class_names,
                                     self.tokenizer, self.device, cfg.seed)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.embed = EmbedBoth(self.model)
        if dist.is_distributed():
            if cfg.accum_mode == "cached":
                raise ValueError("--accum-mode cached is single-process only; under torchrun use independent "
                                 "(every rank's batch is already gathered into one contrastive problem).")
            self.embed = DistributedDataParallel(self.embed)
        if cfg.compile:  # compiles EmbedBoth.forward, i.e. both towers (compiling the model would only cover logits)
            self.embed = torch.compile(self.embed)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay)
        self.steps_per_epoch = len(self.loader) / cfg.accum_steps
        self.total_steps = max(1, int(self.steps_per_epoch * cfg.epochs))
        self.scheduler = warmup_cosine(self.optimizer, cfg.warmup_steps, self.total_steps)
        self.scaler = grad_scaler(self.precision, self.device)
        self.xbm = (CrossBatchMemory(cfg.xbm_size, self.model.cfg.embed_dim, cfg.xbm_warmup_steps, self.device)
                    if cfg.xbm_size else None)
        self.step = self.micro_step = self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of the current epoch done (a resume starts after them)
        self.epoch_losses: list[float] = []  # finite losses of the current epoch, for its log line
        self.skipped_steps = 0  # optimizer steps skipped for non-finite gradients, this epoch
        self.nonfinite = NonFiniteLosses(cfg.max_nonfinite)
        self.stop = StopRequest()
        self.last_save = time.monotonic()
        # cached mode: micro-batches (pixels, ids, labels, epoch, indices) of the step in progress
        self.pending: list[tuple] = []

    def build_dataset(self, items):
        """Decoded from the image files every epoch, or read from the preprocessed uint8 cache."""
        if self.cfg.cache_dir is None:
            transform = build_transform(self.model.cfg, train=True, augment=self.cfg.augment)
            return ImageFolderDataset(items, transform, seed=self.cfg.seed)
        if not self.main:  # rank 0 builds the cache, the others read the finished one
            dist.barrier()
        dataset = CachedImageDataset(items, self.model.cfg, self.cfg.cache_dir, augment=self.cfg.augment,
                                     seed=self.cfg.seed)
        if self.main:
            dist.barrier()
        return dataset

    # ---------------------------------------------------------------- loss
    def loss(self, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The contrastive loss of local anchors against every candidate (local, other ranks, memory)."""
        image, text = image.float(), text.float()  # losses in fp32: sums of up to 32k exponentials
        extra = [(dist.gather_from_other_ranks(image), dist.gather_from_other_ranks(text),
                  dist.gather_from_other_ranks(labels))] if dist.is_distributed() else []
        memory = self.xbm.get() if self.xbm is not None else None
        if memory is not None:
            extra.append(tuple(memory))
        mem_img, mem_txt, mem_lab = (torch.cat(parts) for parts in zip(*extra)) if extra else (None, None, None)
        if self.cfg.model == "clip":
            return clip_loss(image, text, self.model.logit_scale, labels, mem_img, mem_txt, mem_lab)
        pos_weight = None
        if self.cfg.pos_weight == "balanced":
            pos_weight = balanced_pos_weight(labels, mem_lab)
        elif self.cfg.pos_weight != "none":
            pos_weight = float(self.cfg.pos_weight)
        return siglip_loss(image, text, self.model.logit_scale, self.model.logit_bias, labels, pos_weight,
                           mem_img, mem_txt, mem_lab)

    def remember(self, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> None:
        """Enqueue after backward (xbm.py); under DDP the memory holds every rank's rows."""
        if self.xbm is not None:
            gather = dist.gather_with_grad if dist.is_distributed() else (lambda x: x)
            with torch.no_grad():
                image, text, labels = gather(image.detach()), gather(text.detach()), gather(labels)
                if torch.isfinite(image).all() and torch.isfinite(text).all():  # never store a NaN
                    self.xbm.enqueue(image, text, labels)

    # ---------------------------------------------------------------- accumulation modes
    def independent_micro_step(self, pixels, ids, labels, last_of_step: bool) -> float:
        sync = nullcontext() if last_of_step or not dist.is_distributed() else self.embed.no_sync()
        with sync:
            with autocast(self.precision, self.device):
                image, text = self.embed(pixels, ids)
            loss = self.loss(image, text, labels)
            self.scaler.scale(loss / self.cfg.accum_steps).backward()
        self.remember(image, text, labels)
        return loss.item()

    def cached_step(self, batches: list[tuple]) -> float:
        with torch.no_grad(), autocast(self.precision, self.device):
            embs = [self.embed(pixels, ids) for pixels, ids, *_ in batches]
        image = torch.cat([e[0] for e in embs]).float().requires_grad_()
        text = torch.cat([e[1] for e in embs]).float().requires_grad_()
        labels = torch.cat([b[2] for b in batches])
        loss = self.loss(image, text, labels)
        self.scaler.scale(loss).backward()  # d loss / d embeddings, and the logit scale/bias grads
        start = 0
        for pixels, ids, *_ in batches:  # re-run with grad; chain rule through the cached gradients
            end = start + pixels.shape[0]
            with autocast(self.precision, self.device):
                img, txt = self.embed(pixels, ids)
            ((img.float() * image.grad[start:end]).sum() + (txt.float() * text.grad[start:end]).sum()).backward()
            start = end
        self.remember(image, text, labels)
        return loss.item()

    def reread_micro_batch(self, epoch: int, indices: list[int]) -> tuple:
        """A cached-mode micro-batch rebuilt from its (epoch, index) keys (resume): the same pixels,
        labels and prompts as the loader gave, because all three depend on those keys only."""
        items = [self.dataset[(epoch, i)] for i in indices]
        pixels = torch.stack([x for x, _, _ in items]).to(self.device)
        labels = torch.tensor([y for _, y, _ in items]).to(self.device)
        indices = torch.tensor(indices)
        return pixels, self.prompts.sample(labels, indices, epoch, len(self.dataset)), labels, epoch, indices

    def optimizer_step(self) -> None:
        """Clip, step, clamp, schedule. A step whose gradients are not finite is skipped (by the
        GradScaler in fp16, which then lowers its scale; here otherwise) and counted."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
            if self.cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skipped if unscale_ found inf/NaN
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale
        else:  # the norm is computed anyway: max_norm=inf only measures it (and multiplies by 1)
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip or float("inf"))
            skipped = not torch.isfinite(norm).item()
            if not skipped:
                self.optimizer.step()
        if skipped:
            self.skipped_steps += 1
            print(f"\n[train] optimizer step {self.step + 1}: non-finite gradients, step skipped", file=sys.stderr)
        self.optimizer.zero_grad(set_to_none=True)
        clamp_logit_scale_(self.model.logit_scale)  # CLIP sec. 2.5: keep exp(t) <= 100
        with warnings.catch_warnings():  # a skipped first step makes PyTorch warn; the schedule
            warnings.simplefilter("ignore", UserWarning)  # follows steps taken or skipped alike
            self.scheduler.step()
        self.step += 1

    # ---------------------------------------------------------------- epochs
    def train_epoch(self) -> dict:
        """The rest of the current epoch (all of it, unless resumed part-way); returns its log record."""
        self.model.train()
        self.loader.sampler.set_epoch(self.epoch, skip=self.batch_in_epoch * self.cfg.micro_batch)
        start, images, first = time.perf_counter(), 0, self.batch_in_epoch
        n_micro = first + len(self.loader)
        for pixels, labels, indices in self.loader:
            ids = self.prompts.sample(labels, indices, self.epoch, len(self.dataset))
            pixels, labels = pixels.to(self.device, non_blocking=True), labels.to(self.device)
            self.micro_step += 1
            ends_step = self.micro_step % self.cfg.accum_steps == 0
            loss = None
            if self.cfg.accum_mode == "cached":
                self.pending.append((pixels, ids, labels, self.epoch, indices))  # a step may span epochs
                if ends_step:
                    loss = self.cached_step(self.pending)
                    self.pending = []
            else:
                loss = self.independent_micro_step(pixels, ids, labels, ends_step)
            if ends_step:
                self.optimizer_step()
            self.batch_in_epoch += 1
            images += pixels.shape[0] * dist.world_size()
            if loss is not None:  # under DDP a non-finite loss on any rank counts on all (they stop together)
                agreed = float("nan") if dist.any_rank(not math.isfinite(loss)) else loss
                if self.nonfinite.observe(agreed, f"epoch {self.epoch + 1}, micro-batch {self.batch_in_epoch}, "
                                                  f"step {self.step}"):
                    self.epoch_losses.append(loss)
            self.progress(self.batch_in_epoch - first, n_micro - first, n_micro, images, start)
            self.after_micro_batch()
        record = {"epoch": self.epoch + 1, "loss": sum(self.epoch_losses) / max(1, len(self.epoch_losses)),
                  "epoch_time_s": time.perf_counter() - start, "images_per_s": images / (time.perf_counter() - start),
                  "lr": self.scheduler.get_last_lr()[0], "logit_scale": self.model.logit_scale.item(),
                  "logit_bias": None if self.model.logit_bias is None else self.model.logit_bias.item(),
                  "step": self.step, "nonfinite_losses": self.nonfinite.total, "skipped_steps": self.skipped_steps,
                  "skipped_images": len(getattr(self.dataset, "skipped", []))}
        self.epoch += 1
        self.batch_in_epoch, self.epoch_losses, self.skipped_steps, self.nonfinite.total = 0, [], 0, 0
        return record

    def after_micro_batch(self) -> None:
        """Stop cleanly if asked (every rank agrees), else checkpoint if one is due."""
        if dist.any_rank(self.stop.requested):
            self.save()
            raise TrainingStopped(f"stopped by {self.stop.signal_name or 'another rank'} after epoch "
                                  f"{self.epoch + 1} micro-batch {self.batch_in_epoch}; the checkpoint is in "
                                  f"{self.out}/checkpoint: continue with the same command and --resume.", exit_code=130)
        by_count = self.cfg.checkpoint_every and self.micro_step % self.cfg.checkpoint_every == 0
        by_time = self.cfg.checkpoint_minutes and time.monotonic() - self.last_save >= 60 * self.cfg.checkpoint_minutes
        if by_count or by_time:
            self.save()

    def save(self) -> None:
        if self.main:
            save_training_state(self)
        self.last_save = time.monotonic()

    def progress(self, i: int, n: int, n_epoch: int, images: int, start: float) -> None:
        """One updating line: i of this session's n micro-batches, out of the epoch's n_epoch."""
        if not self.main or not self.epoch_losses:
            return
        elapsed = time.perf_counter() - start
        eta = elapsed / i * (n - i + n_epoch * (self.cfg.epochs - self.epoch - 1))
        end = "\n" if i == n else ""
        print(f"\repoch {self.epoch + 1}/{self.cfg.epochs} batch {self.batch_in_epoch}/{n_epoch} step {self.step} "
              f"loss {self.epoch_losses[-1]:.4f} {images / elapsed:.1f} img/s ETA {eta / 60:.1f} min",
              end=end, flush=True)

    def explain_batch(self) -> None:
        n = len(self.dataset) * dist.world_size()
        eff = self.cfg.effective_batch * dist.world_size()
        print(f"[train] {self.cfg.model}: {n} training images, {len(self.class_names)} classes, "
              f"micro-batch {self.cfg.micro_batch} x accum {self.cfg.accum_steps} x {dist.world_size()} rank(s) "
              f"= effective batch {eff}; XBM {self.cfg.xbm_size}; precision {self.precision}; "
              f"{self.total_steps} optimizer step(s) over {self.cfg.epochs} epoch(s)")
        if eff > n:
            print(f"[train] note: the effective batch ({eff}) exceeds the training set ({n} images): one "
                  f"optimizer step spans {eff / n:.1f} epochs, so {self.cfg.epochs} epochs make only "
                  f"{self.total_steps} step(s). Lower --accum-steps for more updates.")
        skipped = getattr(self.dataset, "skipped", [])
        for path, reason in skipped:
            print(f"[train] skipped unreadable image {path}: {reason}")
        ignored = non_image_files(self.data)
        if skipped or ignored:
            write_skipped(self.out, "train", skipped + ignored)
            print(f"[train] {len(skipped)} unreadable image(s) skipped, {len(ignored)} non-image file(s) "
                  f"ignored: listed in {self.out}/skipped.txt")

    def save_label_space(self) -> None:
        """classes.json and prompts.json make the run directory self-describing: `predict` and
        `evaluate` on it use the classes and template bank it was trained with."""
        (self.out / "classes.json").write_text(json.dumps(self.class_names, indent=2) + "\n")
        source = Path(self.cfg.prompts) if self.cfg.prompts else DEFAULT_PROMPTS
        if source.resolve() != (self.out / "prompts.json").resolve():
            shutil.copy(source, self.out / "prompts.json")

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.resume:
            load_training_state(self)
        elif self.main:  # a resumed run keeps the files its first start wrote
            (self.out / "log.jsonl").write_text("")
            self.cfg.save(self.out / "train_config.json")
            self.save_label_space()
        if self.main:
            self.explain_batch()
        with self.stop:
            while self.epoch < self.cfg.epochs:
                record = self.train_epoch()
                if self.main:
                    with open(self.out / "log.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                self.save()
            if self.micro_step % self.cfg.accum_steps:  # the last, partial step is not thrown away
                if self.pending:
                    self.cached_step(self.pending)
                self.optimizer_step()
        metrics = {}
        if self.main:
            save_model(self.model, self.out)
            for name in TOKENIZER_FILES:
                if (self.weights / name).is_file() and self.weights.resolve() != self.out.resolve():
                    shutil.copy(self.weights / name, self.out / name)
            metrics = evaluate_model(self.model, self.tokenizer, self.data, self.out, self.cfg.prompts,
                                     self.cfg.eval_batch, self.cfg.workers, autocast=autocast(self.precision, self.device))
            print(f"[train] test accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
                  f"-> {self.out}/metrics.json", file=sys.stdout)
        dist.cleanup()
        return metrics


def train(cfg: TrainConfig, weights, data, out, resume: bool = False, overwrite: bool = False) -> dict:
    return Trainer(cfg, weights, data, out, resume=resume, overwrite=overwrite).run()
