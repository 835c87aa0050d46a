"""Cross-batch memory (XBM; Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020).

A ring buffer of detached, L2-normalized image and text embeddings of earlier steps with
their class labels. The losses take them as their `memory` candidates (never anchors), so each
anchor is scored against B + M candidates while only the B batch rows carry gradient (unlike the
losses' `gathered` rows: this step's rows from other ranks or micro-batches, which carry it).
The XBM paper's observation is that embeddings drift slowly once training settles, so
old embeddings are still useful negatives/positives; the warm-up skips the fast-drifting
start.

Training-loop call order (one optimizer step or micro-batch):

    memory = xbm.get()                            # read BEFORE this batch is enqueued
    loss = clip_loss(img, txt, logit_scale, labels, memory=memory)
    #   or siglip_loss(img, txt, logit_scale, logit_bias, labels, pos_weight, memory=memory)
    loss.backward()
    xbm.enqueue(img, txt, labels)                 # after backward

Reading first means the current batch is never both a batch row and a memory row. It does not
keep an image's earlier rows out: once the memory spans an epoch boundary (always, when it holds
more rows than the training set has images: the SigLIP preset's 32,000 against about 10,700) an
anchor can meet a stale row of its own image. It carries the anchor's class label, so with class
labels (training always passes them) it is a positive, like every other row of the class; the
losses never tell it apart from them. tests/test_xbm.py shows it.
Enqueue after backward: `get()` returns views of the buffers (no 2 x [M, D] copy per
step), which autograd has saved for the backward pass; writing them before backward
makes autograd raise "modified by an inplace operation" instead of computing wrong
gradients.

A plain class rather than an nn.Module: it holds no parameters, must not end up in the
model's state_dict, and has its own `state_dict` / `load_state_dict` for checkpoints.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _normalized(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Detached unit rows in `dtype`, normalized in at least float32 so bf16 inputs lose nothing extra."""
    x = x.detach()
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1).to(dtype)


class Memory(NamedTuple):
    """Filled memory entries; unpacks as (image, text, labels), the triple the losses take as `memory`."""

    image: Tensor  # [M, D], L2-normalized, no grad
    text: Tensor  # [M, D], L2-normalized, no grad
    labels: Tensor  # [M] long


class CrossBatchMemory:
    """Ring buffer of the last `size` (image, text, label) rows.

    Embeddings are stored L2-normalized (the losses only use directions, and unit vectors
    are safe in low precision) in `dtype` (float32 by default) on `device`.
    Warm-up counts `enqueue` calls: `get()` returns None until `warmup_steps` batches have
    been enqueued (the XBM paper switches the memory on after a warm-up), and while empty.
    """

    def __init__(self, size: int, dim: int, warmup_steps: int = 0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if size <= 0:
            raise ValueError(f"Cross-batch memory size must be > 0, got {size}; set it to at least the batch size.")
        self.size, self.dim, self.warmup_steps = size, dim, warmup_steps
        self.image = torch.zeros(size, dim, device=device, dtype=dtype)
        self.text = torch.zeros(size, dim, device=device, dtype=dtype)
        self.labels = torch.zeros(size, device=device, dtype=torch.long)
        self.pointer = 0  # row the next enqueued row goes to
        self.filled = 0  # number of valid rows; they are rows [0, filled) until the first wrap
        self.steps = 0  # enqueue calls so far (for the warm-up)

    @torch.no_grad()
    def enqueue(self, image_emb: Tensor, text_emb: Tensor, labels: Tensor) -> None:
        """Write a batch at the pointer, wrapping around; rows older than `size` are overwritten.

        The result is the same as writing the rows one by one: a batch longer than what is left
        before the end wraps to the start, and of a batch longer than `size` only its last
        `size` rows survive.
        """
        n = image_emb.shape[0]
        if n > self.size:  # only the last `size` rows would survive a row-by-row write
            image_emb, text_emb, labels = image_emb[-self.size:], text_emb[-self.size:], labels[-self.size:]
        start = (self.pointer + n - image_emb.shape[0]) % self.size
        rows = (start + torch.arange(image_emb.shape[0], device=self.image.device)) % self.size
        self.image[rows] = _normalized(image_emb, self.image.dtype)
        self.text[rows] = _normalized(text_emb, self.text.dtype)
        self.labels[rows] = labels.detach().to(self.labels)
        self.pointer = (self.pointer + n) % self.size
        self.filled = min(self.filled + n, self.size)
        self.steps += 1

    def get(self) -> Memory | None:
        """The filled entries (views, no grad), or None during warm-up or while empty."""
        if self.steps < self.warmup_steps or self.filled == 0:
            return None
        return Memory(self.image[:self.filled], self.text[:self.filled], self.labels[:self.filled])

    def state_dict(self) -> dict:
        return {"image": self.image.clone(), "text": self.text.clone(), "labels": self.labels.clone(),
                "pointer": self.pointer, "filled": self.filled, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["image"].shape) != (self.size, self.dim):
            raise ValueError(f"Checkpoint memory has shape {tuple(state['image'].shape)} but this run expects "
                             f"{(self.size, self.dim)}; use the same memory size and embedding dim to resume.")
        self.image.copy_(state["image"])
        self.text.copy_(state["text"])
        self.labels.copy_(state["labels"])
        self.pointer, self.filled, self.steps = int(state["pointer"]), int(state["filled"]), int(state["steps"])
