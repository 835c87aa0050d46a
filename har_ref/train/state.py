"""What a run carries from one micro-batch to the next, as plain data.

`Run` is what a run is made of and never changes once built (the model, the data, the loss chosen
for the family); `TrainState` is what changes as it trains, besides the weights themselves: the
optimizer, schedule, GradScaler and memory, the counters, the position inside the epoch and the
micro-batches of an optimizer step still being accumulated. A checkpoint is the model's weights
plus a TrainState (checkpoint.py), so resuming is loading one and calling the same loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from ..data.prompts import PromptSampler
from ..model.dual_encoder import DualEncoder
from .config import TrainConfig
from .faults import NonFiniteLosses, StopRequest
from .xbm import CrossBatchMemory


class MicroBatch(NamedTuple):
    pixels: torch.Tensor  # [B, 3, H, W]
    ids: torch.Tensor  # [B, L] the prompt drawn for each image
    labels: torch.Tensor  # [B]
    epoch: int
    indices: torch.Tensor  # [B] dataset indices: with `epoch`, the keys everything above is a function of


@dataclass(frozen=True)
class Run:
    cfg: TrainConfig
    out: Path
    weights: Path
    data: Path
    device: torch.device
    precision: str
    model: DualEncoder
    embed: torch.nn.Module  # the towers as one module: what DDP and torch.compile wrap
    tokenizer: Callable
    class_names: list[str]
    dataset: torch.utils.data.Dataset
    loader: torch.utils.data.DataLoader
    prompts: PromptSampler
    loss: Callable  # (image, text, labels, gathered, memory) -> loss, the family's, settings bound once (setup.py::choose_loss)
    total_steps: int
    main: bool  # rank 0 writes files and prints
    stop: StopRequest


@dataclass
class TrainState:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    xbm: CrossBatchMemory | None
    nonfinite: NonFiniteLosses
    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken (or skipped for non-finite gradients)
    micro_step: int = 0  # micro-batches done, over all epochs
    batch_in_epoch: int = 0  # micro-batches of the current epoch done (a resume starts after them)
    epoch_losses: list[float] = field(default_factory=list)  # finite losses of the current epoch, for its log line
    skipped_steps: int = 0  # optimizer steps skipped for non-finite gradients, this epoch
    pending: list[MicroBatch] = field(default_factory=list)  # cached mode: micro-batches of the step in progress
    last_save: float = field(default_factory=time.monotonic)
