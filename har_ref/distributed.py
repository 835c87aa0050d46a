"""torchrun + DDP helpers. In a single process every function is an identity or a no-op.

Contrastive losses need the other ranks' embeddings as candidates. The recipe (open_clip's
`local_loss=True, gather_with_grad=True`):

    others = tuple(gather_from_other_ranks(x) for x in (img, txt, labels))
    loss = clip_loss(img, txt, logit_scale, labels, gathered=others)

Each rank's anchors are its own B rows, scored against all W*B candidates (the other
ranks' rows enter the losses as `gathered` candidates; candidate order does not matter).
Why that per-rank loss is the right one: the full-batch loss is a mean over all W*B
anchors, so it equals (1/W) * sum_r loss_r when loss_r is the mean over rank r's anchors.
The gather's backward sums, into each rank's shard, the gradients of every rank's
loss_r, and DDP averages parameter gradients over ranks: the result is the gradient of
(1/W) * sum_r loss_r, i.e. of the single-process loss on the concatenated batch.
Under DDP, shards must have equal sizes (use drop_last=True).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def setup_distributed() -> torch.device:
    """Join the process group torchrun describes (WORLD_SIZE > 1); return this process's device.

    Backend: nccl when CUDA is available (one GPU per process, picked by LOCAL_RANK), else gloo.
    Without torchrun (no WORLD_SIZE, or 1) nothing is initialized.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not is_distributed():
        # init_method env:// reads MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE set by torchrun.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return device


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns, to each rank, the SUM over ranks of the
    gradient w.r.t. its own shard.

    The backward is an all_reduce followed by taking the local slice: the simplest correct
    form, and all_reduce exists on every backend (gloo and nccl) and PyTorch version. A
    reduce_scatter would move W times less data, which does not matter for [W*B, D]
    embedding gradients next to the model's own gradient all-reduce.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.shard_size = x.shape[0]
        shards = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(shards, x.contiguous())
        return torch.cat(shards, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.shard_size
        return grad[start:start + ctx.shard_size]


def gather_with_grad(x: Tensor) -> Tensor:
    """All ranks' rows in rank order, [W*B, ...]; gradients flow back to each rank's own rows."""
    if not is_distributed() or world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def gather_from_other_ranks(x: Tensor) -> Tensor:
    """The rows of every other rank, [(W-1)*B, ...], with gradient; empty in a single process.

    Pass these as the losses' `gathered` candidates next to the local batch.
    """
    gathered = gather_with_grad(x)
    start = rank() * x.shape[0]
    return torch.cat([gathered[:start], gathered[start + x.shape[0]:]], dim=0)


def all_gather_object(obj) -> list:
    """Every rank's `obj` (plain Python values), in rank order; [obj] in a single process."""
    if not is_distributed():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the sum of `tensor` over every rank (itself in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank: decisions that change control flow (stop
    now) must be taken by all ranks together, or the others would wait forever in a collective."""
    if not is_distributed():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
