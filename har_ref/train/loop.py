"""End-to-end contrastive fine-tuning of a DualEncoder on HAR folders (study sec. 3), top-down.

    train(cfg, weights, data, out)
      setup (setup.py)           the model, data, prompts, optimizer: a Run and a fresh or resumed TrainState
      for each epoch:
        train_epoch
          for each micro-batch:  draw prompts, then one of the two accumulation modes:
            independent_micro_step   each micro-batch is its own contrastive problem; grads summed
            cached_step              the whole effective batch is one problem (GradCache)
            optimizer_step           clip, step, clamp t, schedule (every accum_steps micro-batches)
            after_micro_batch        stop cleanly if asked, checkpoint if due
      finish                     the last partial step, the weights, the test-split evaluation

One step: embed both towers, score every image against every prompt of the batch (+ the gathered
rows: other ranks' under DDP, the step's other micro-batches in cached mode; + the cross-batch
memory's rows of earlier steps), and descend on CLIP's InfoNCE or SigLIP's sigmoid loss,
same-class pairs being positives (losses.py). Cached accumulation (Gao et al. 2021; open_clip
--accum-freq) embeds every micro-batch without grad, takes the loss gradient w.r.t. the embeddings,
then re-runs each micro-batch with grad and backpropagates those: exact large-batch gradients at one
micro-batch's activation memory.

Everything a micro-batch depends on is a function of (seed, epoch, index), so a run resumed from a
checkpoint (checkpoint.py) continues bit for bit; faults.py has the clean stop and the non-finite guard.
state.py says what a Run and a TrainState hold.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

from .. import distributed as dist
from ..eval.evaluate import evaluate_test_splits
from ..model.dual_encoder import save_model
from ..model.tokenizer import TOKENIZER_FILES
from . import checkpoint
from .config import TrainConfig
from .faults import TrainingStopped
from .losses import clamp_logit_scale_
from .optim import autocast
from .setup import locked_tower, setup
from .state import MicroBatch, Run, TrainState


def train(cfg: TrainConfig, weights, data, out, resume: bool | str = False, overwrite: bool = False) -> dict:
    """Fine-tune the checkpoint WEIGHTS on DATA into the run directory OUT; returns the test metrics.
    `resume`: True continues OUT's checkpoint; "auto" continues it, starts, or leaves a finished run as it
    is, whichever OUT calls for (checkpoint.py::auto_resume), so the same command can always be re-run."""
    weights, data, out = Path(weights), Path(data), Path(out)
    if resume == "auto":
        if overwrite:
            raise ValueError("--resume auto and --overwrite contradict each other; pass one of them.")
        mode = checkpoint.auto_resume(out, weights, data, cfg)
        if mode == "finished":
            return finished_metrics(out)
        if mode == "restart" and dist.is_main_process():
            print(f"[train] {out} holds this run's first files but no checkpoint yet: starting it again")
        resume, overwrite = mode == "resume", mode == "restart"
    run, state = setup(cfg, weights, data, out, resume, overwrite)  # setup.py
    with run.stop:
        while state.epoch < cfg.epochs:
            record = train_epoch(run, state)
            if run.main:
                with open(run.out / "log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            save_checkpoint(run, state)
        if state.micro_step % cfg.accum_steps:  # the last, partial step is not thrown away
            if state.pending:
                cached_step(run, state, state.pending)
            optimizer_step(run, state)
    return finish(run)


# ---------------------------------------------------------------- one epoch

def train_epoch(run: Run, state: TrainState) -> dict:
    """The rest of the current epoch (all of it, unless resumed part-way); returns its log record."""
    cfg = run.cfg
    train_mode(run)
    run.loader.sampler.set_epoch(state.epoch, skip=state.batch_in_epoch * cfg.micro_batch)
    start, images, first = time.perf_counter(), 0, state.batch_in_epoch
    n_micro = first + len(run.loader)
    for pixels, labels, indices in run.loader:
        ids = run.prompts.sample(labels, indices, state.epoch, len(run.dataset))
        batch = MicroBatch(pixels.to(run.device, non_blocking=True), ids, labels.to(run.device), state.epoch, indices)
        state.micro_step += 1
        ends_step = state.micro_step % cfg.accum_steps == 0
        loss = None
        if cfg.accum_mode == "cached":
            state.pending.append(batch)  # a step may span epochs
            if ends_step:
                loss = cached_step(run, state, state.pending)
                state.pending = []
        else:
            loss = independent_micro_step(run, state, batch, ends_step)
        if ends_step:
            optimizer_step(run, state)
        state.batch_in_epoch += 1
        images += pixels.shape[0] * dist.world_size()
        if loss is not None:  # under DDP a non-finite loss on any rank counts on all (they stop together)
            agreed = float("nan") if dist.any_rank(not math.isfinite(loss)) else loss
            if state.nonfinite.observe(agreed, f"epoch {state.epoch + 1}, micro-batch {state.batch_in_epoch}, "
                                               f"step {state.step}"):
                state.epoch_losses.append(loss)
        progress(run, state, state.batch_in_epoch - first, n_micro - first, n_micro, images, start)
        after_micro_batch(run, state)
    elapsed = time.perf_counter() - start
    record = {"epoch": state.epoch + 1, "loss": sum(state.epoch_losses) / max(1, len(state.epoch_losses)),
              "epoch_time_s": elapsed, "images_per_s": images / elapsed,
              "lr": state.scheduler.get_last_lr()[0], "logit_scale": run.model.logit_scale.item(),
              "logit_bias": None if run.model.logit_bias is None else run.model.logit_bias.item(),
              "step": state.step, "nonfinite_losses": state.nonfinite.total, "skipped_steps": state.skipped_steps,
              "skipped_images": len(getattr(run.dataset, "skipped", [])),
              "memory_rows": 0 if state.xbm is None or state.xbm.get() is None else state.xbm.filled}
    state.epoch += 1
    state.batch_in_epoch, state.epoch_losses, state.skipped_steps, state.nonfinite.total = 0, [], 0, 0
    return record


def train_mode(run: Run) -> None:
    """Both towers in training mode, but a locked one (--lock) stays in eval mode: it is not being trained."""
    run.model.train()
    if run.cfg.lock:
        locked_tower(run.model, run.cfg.lock).eval()


# ---------------------------------------------------------------- the loss and the two accumulation modes

def contrastive_loss(run: Run, state: TrainState, image: torch.Tensor, text: torch.Tensor,
                     labels: torch.Tensor) -> torch.Tensor:
    """The loss of local anchors against every candidate: local rows, other ranks' rows, the memory."""
    image, text = at_least_fp32(image), at_least_fp32(text)  # sums of up to 32k exponentials
    others = [tuple(dist.gather_from_other_ranks(x) for x in (image, text, labels))] if dist.is_distributed() else []
    return run.loss(image, text, labels, gathered_rows(others), memory_rows(state))


def gathered_rows(parts: list[tuple]) -> tuple | None:
    """The gathered candidates, rows of this step that carry gradient (other ranks' rows, the step's
    other micro-batches), as one (images, texts, labels) triple; None when there are none."""
    if len(parts) < 2:
        return parts[0] if parts else None
    return tuple(torch.cat(columns) for columns in zip(*parts))


def memory_rows(state: TrainState):
    """The memory candidates, detached rows of earlier steps (xbm.py); None without a memory or in warm-up."""
    return state.xbm.get() if state.xbm is not None else None


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 embeddings to fp32 for the loss; fp64 ones (the tests' exact comparisons) stay fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def remember(state: TrainState, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> None:
    """Enqueue after backward (xbm.py); under DDP the memory holds every rank's rows."""
    if state.xbm is not None:
        gather = dist.gather_with_grad if dist.is_distributed() else (lambda x: x)
        with torch.no_grad():
            image, text, labels = gather(image.detach()), gather(text.detach()), gather(labels)
            if torch.isfinite(image).all() and torch.isfinite(text).all():  # never store a NaN
                state.xbm.enqueue(image, text, labels)


def independent_micro_step(run: Run, state: TrainState, batch: MicroBatch, last_of_step: bool) -> float:
    """One micro-batch as its own contrastive problem; its gradient adds to the step's (DDP syncs on the last)."""
    sync = nullcontext() if last_of_step or not dist.is_distributed() else run.embed.no_sync()
    with sync:
        with autocast(run.precision, run.device):
            image, text = run.embed(batch.pixels, batch.ids)
        loss = contrastive_loss(run, state, image, text, batch.labels)
        state.scaler.scale(loss / run.cfg.accum_steps).backward()
    remember(state, image, text, batch.labels)
    return loss.item()


def cached_step(run: Run, state: TrainState, batches: list[MicroBatch]) -> float:
    """The step's micro-batches, on every rank, as one contrastive problem (GradCache): embed all
    without a graph, take d loss / d embeddings once, then re-run each micro-batch with a graph and
    chain those gradients in.

    Why this is the gradient of the single-process loss L on all W*K*B rows (W ranks, K micro-batches
    of B): L is a mean over its anchors, so L = (1/W) * sum_r loss_r, loss_r being the mean over rank
    r's K*B anchors against every candidate (contrastive_loss: own rows, other ranks' rows, memory).
    The gather's backward (distributed.py) sums into each rank's rows the gradients of every loss_r,
    so the cached gradient of each embedding e is W * dL/de, and the re-runs give rank r
        sum over its rows of  W * dL/de * de/dtheta   +   d loss_r / d(t, b).
    DDP averages that over ranks on the last micro-batch (the others run under no_sync and only
    accumulate): sum over all rows of dL/de * de/dtheta + (1/W) sum_r d loss_r / d(t, b), which is
    dL/dtheta and dL/d(t, b). The t and b gradients are taken out of .grad after the loss's backward
    and chained in again on the last re-run, inside DDP's backward: there DDP averages them; left in
    .grad they would stay each rank's own. In a single process (W = 1) every factor is 1.
    """
    with torch.no_grad(), autocast(run.precision, run.device):
        embs = [run.embed(batch.pixels, batch.ids) for batch in batches]
    image = at_least_fp32(torch.cat([e[0] for e in embs])).requires_grad_()
    text = at_least_fp32(torch.cat([e[1] for e in embs])).requires_grad_()
    labels = torch.cat([batch.labels for batch in batches])
    loss = loss_backward_by_blocks(run, state, image, text, labels)  # d loss / d embeddings, and t's and b's
    loss_params = [p for p in (run.model.logit_scale, run.model.logit_bias) if p is not None and p.grad is not None]
    loss_grads = [p.grad for p in loss_params]
    for p in loss_params:
        p.grad = None
    start = 0
    for i, batch in enumerate(batches):  # re-run with grad; chain rule through the cached gradients
        end, last = start + batch.pixels.shape[0], i == len(batches) - 1
        with nullcontext() if last or not dist.is_distributed() else run.embed.no_sync():
            with autocast(run.precision, run.device):
                img, txt = run.embed(batch.pixels, batch.ids)
            chained = ((at_least_fp32(img) * image.grad[start:end]).sum()
                       + (at_least_fp32(txt) * text.grad[start:end]).sum())
            if last:
                chained = chained + sum((p * g).sum() for p, g in zip(loss_params, loss_grads))
            chained.backward()
        start = end
    remember(state, image, text, labels)
    return loss


def loss_backward_by_blocks(run: Run, state: TrainState, image: torch.Tensor, text: torch.Tensor,
                            labels: torch.Tensor) -> float:
    """contrastive_loss of all the step's rows and its backward, one micro-batch of anchors at a time.

    Both losses are means over their anchors, each anchor scored against every candidate. So the loss
    of n anchors is the size-weighted mean of the losses of its blocks, each block's anchors scored
    against the same candidates (the block itself, the rest of the step's rows, other ranks' rows,
    the memory), and so are the gradients: one block's [B, N] logits are alive at a time instead of
    the [n, N] of all K micro-batches. The other ranks' rows are gathered once; their gradients are
    collected over the blocks and sent back through the gather once, at the end."""
    n, B = image.shape[0], run.cfg.micro_batch
    if n <= B:
        loss = contrastive_loss(run, state, image, text, labels)
        state.scaler.scale(loss).backward()
        return loss.item()
    gathered = [dist.gather_from_other_ranks(x) for x in (image, text)] if dist.is_distributed() else []
    other_rows = [x.detach().requires_grad_() for x in gathered]
    others = [(*other_rows, dist.gather_from_other_ranks(labels))] if gathered else []
    total = 0.0
    for start in range(0, n, B):
        end = min(start + B, n)
        rest = tuple(torch.cat([x[:start], x[end:]]) for x in (image, text, labels))  # the step's other rows
        loss = run.loss(image[start:end], text[start:end], labels[start:end], gathered_rows([rest] + others),
                        memory_rows(state)) * ((end - start) / n)
        state.scaler.scale(loss).backward()
        total += loss.item()
    if gathered:
        torch.autograd.backward(gathered, [x.grad for x in other_rows])
    return total


def optimizer_step(run: Run, state: TrainState) -> None:
    """Clip, step, clamp, schedule. A step whose gradients are not finite is skipped (by the
    GradScaler in fp16, which then lowers its scale; here otherwise) and counted."""
    params = [p for p in run.model.parameters() if p.grad is not None]
    clip = run.cfg.grad_clip
    if state.scaler.is_enabled():
        state.scaler.unscale_(state.optimizer)
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        scale = state.scaler.get_scale()
        state.scaler.step(state.optimizer)  # skipped if unscale_ found inf/NaN
        state.scaler.update()
        skipped = state.scaler.get_scale() < scale
    else:  # the norm is computed anyway: max_norm=inf only measures it (and multiplies by 1)
        norm = torch.nn.utils.clip_grad_norm_(params, clip or float("inf"))
        skipped = not torch.isfinite(norm).item()
        if not skipped:
            state.optimizer.step()
    if skipped:
        state.skipped_steps += 1
        print(f"\n[train] optimizer step {state.step + 1}: non-finite gradients, step skipped", file=sys.stderr)
    state.optimizer.zero_grad(set_to_none=True)
    if run.cfg.clamp_logit_scale == "upstream":  # InfoNCE: exp(t) <= 100; the sigmoid loss: free
        clamp_logit_scale_(run.model.logit_scale, run.cfg.loss)
    with warnings.catch_warnings():  # a skipped first step makes PyTorch warn; the schedule
        warnings.simplefilter("ignore", UserWarning)  # follows steps taken or skipped alike
        state.scheduler.step()
    state.step += 1


# ---------------------------------------------------------------- checkpoints, progress, the end

def after_micro_batch(run: Run, state: TrainState) -> None:
    """Stop cleanly if asked (every rank agrees), else checkpoint if one is due."""
    if dist.any_rank(run.stop.requested):
        save_checkpoint(run, state)
        raise TrainingStopped(f"stopped by {run.stop.signal_name or 'another rank'} after epoch "
                              f"{state.epoch + 1} micro-batch {state.batch_in_epoch}; the checkpoint is in "
                              f"{run.out}/checkpoint: continue with the same command and --resume.", exit_code=130)
    cfg = run.cfg
    by_count = cfg.checkpoint_every and state.micro_step % cfg.checkpoint_every == 0
    by_time = cfg.checkpoint_minutes and time.monotonic() - state.last_save >= 60 * cfg.checkpoint_minutes
    if by_count or by_time:
        save_checkpoint(run, state)


def save_checkpoint(run: Run, state: TrainState) -> None:
    """Rank 0 writes; every rank's pending micro-batch keys go in (cached mode: each rank re-reads its own).

    Independent mode under torchrun, mid-step: each rank holds its own partial gradient sum g_r (no_sync),
    and the step's end averages sum_r g_r over the ranks. Only that sum matters, so the checkpoint holds
    it (one all-reduce of a copy; the running ranks keep their own) and a resumed rank 0 starts from it,
    the other ranks from zero: the same step, up to the order of the floating-point additions."""
    pending = dist.all_gather_object([(batch.epoch, batch.indices.tolist()) for batch in state.pending])
    grads = None
    if dist.is_distributed() and any(p.grad is not None for p in run.model.parameters()):
        grads = {n: p.grad.detach().clone() for n, p in run.model.named_parameters() if p.grad is not None}
        for grad in grads.values():
            dist.all_reduce_sum(grad)
    if run.main:
        checkpoint.save(run.model, state, run.out, pending, grads)
    state.last_save = time.monotonic()


def finished_metrics(out: Path) -> dict:
    """A finished run's test metrics as train returns them, read back; nothing in OUT is touched."""
    metrics = json.loads((out / "metrics.json").read_text())
    if (out / "metrics_shift.json").is_file():
        metrics["shift"] = json.loads((out / "metrics_shift.json").read_text())
    print(f"[train] {out} holds this run, finished (test macro-F1 {metrics['macro_f1']:.4f}): left as it is")
    return metrics


def progress(run: Run, state: TrainState, i: int, n: int, n_epoch: int, images: int, start: float) -> None:
    """One updating line: i of this session's n micro-batches, out of the epoch's n_epoch."""
    if not run.main or not state.epoch_losses:
        return
    elapsed = time.perf_counter() - start
    eta = elapsed / i * (n - i + n_epoch * (run.cfg.epochs - state.epoch - 1))
    end = "\n" if i == n else ""
    print(f"\repoch {state.epoch + 1}/{run.cfg.epochs} batch {state.batch_in_epoch}/{n_epoch} step {state.step} "
          f"loss {state.epoch_losses[-1]:.4f} {images / elapsed:.1f} img/s ETA {eta / 60:.1f} min",
          end=end, flush=True)


def finish(run: Run) -> dict:
    """Write the trained weights and tokenizer into the run directory and evaluate on the test split."""
    metrics = {}
    if run.main:
        save_model(run.model, run.out)
        for name in TOKENIZER_FILES:
            if (run.weights / name).is_file() and run.weights.resolve() != run.out.resolve():
                shutil.copy(run.weights / name, run.out / name)
        metrics = evaluate_test_splits(run.model, run.tokenizer, run.data, run.out, run.cfg.prompts,
                                       run.cfg.eval_batch, run.cfg.workers, autocast(run.precision, run.device),
                                       run.cfg.shift_split)
        print(f"[train] test accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
              f"-> {run.out}/metrics.json", file=sys.stdout)
        if "shift" in metrics:
            print(f"[train] shifted test split ({run.cfg.shift_split}): accuracy {metrics['shift']['accuracy']:.4f}, "
                  f"macro-F1 {metrics['shift']['macro_f1']:.4f} -> {run.out}/metrics_shift.json", file=sys.stdout)
    dist.cleanup()
    return metrics
