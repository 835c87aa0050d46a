"""Transformer building blocks shared by the vision and text towers.

A pre-LayerNorm block (Vaswani et al. 2017, with the pre-norm placement of
Radford et al. 2019) used unchanged by CLIP and SigLIP:
    x = x + Attn(LN1(x));  x = x + MLP(LN2(x))
The families differ only in the MLP activation and the LayerNorm epsilon.

Both towers read one position of the last block's output (class token, end-of-text token or
last token; SigLIP's image tower is the exception, its pooling head reads all of them). A block
computes each output row from the whole input but independently of the other output rows, so
`Transformer(x, pool=...)` runs the last block for the pooled rows only: keys and values still
come from every position, while the query projection, attention output, MLP and their backward
pass shrink from L rows to one. Same result, ~7% less work per 12-block tower.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x) = silu(1.702 x) / 1.702.
    # Through SiLU's fused kernel: faster, and autograd keeps one tensor for backward instead of two.
    return F.silu(1.702 * x) / 1.702


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # transformers' "gelu_pytorch_tanh", what the big_vision SigLIP checkpoints use.
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu_tanh": gelu_tanh, "gelu": F.gelu}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"config.json: unknown activation {name!r}; use one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[b, rows[b]] for each sequence b: [B, L, D], [B] -> [B, 1, D]."""
    return x[torch.arange(x.shape[0], device=x.device), rows].unsqueeze(1)


def mask_rows(attn_mask: torch.Tensor | None, is_causal: bool, rows: torch.Tensor, L: int):
    """The attention mask of the queries at `rows` ([B, 1, 1, L]) from the full one ([B, 1, L or 1, L])."""
    if is_causal:  # a query at position p sees keys 0..p
        return (torch.arange(L, device=rows.device) <= rows[:, None]).view(-1, 1, 1, L)
    if attn_mask is None or attn_mask.shape[2] == 1:  # none, or the same for every query
        return attn_mask
    return attn_mask[torch.arange(rows.shape[0], device=rows.device), :, rows].unsqueeze(2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused q, k, v projection (one matmul instead of three)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"config.json: width {width} is not divisible by heads {heads}.")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)  # rows ordered q, k, v
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, D] -> [B, L, D]; with `rows` ([B]) only the output at those positions, [B, 1, D]."""
        B, L, D = x.shape
        h, d = self.heads, D // self.heads
        if rows is None:
            # unbind(2) (not a permute to [3, B, h, L, d]): the backward then stacks the q, k, v
            # gradients straight into qkv's [B, L, 3D] layout, saving a copy per block.
            q, k, v = self.qkv(x).view(B, L, 3, h, d).unbind(2)
        else:
            w_q, w_kv = self.qkv.weight.split([D, 2 * D])
            b_q, b_kv = self.qkv.bias.split([D, 2 * D])
            q = F.linear(take_rows(x, rows), w_q, b_q).view(B, 1, h, d)
            k, v = F.linear(x, w_kv, b_kv).view(B, L, 2, h, d).unbind(2)
        # softmax(q k^T / sqrt(d_head) + mask) v  (Vaswani et al. 2017, eq. 1); scale is SDPA's default.
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=attn_mask, is_causal=is_causal)
        return self.out(y.transpose(1, 2).reshape(B, -1, D))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, ln_eps: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(width, eps=ln_eps)
        self.attn = SelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width, eps=ln_eps)
        self.mlp = MLP(width, mlp_dim, act)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        residual = x if rows is None else take_rows(x, rows)
        x = residual + self.attn(self.ln1(x), attn_mask=attn_mask, is_causal=is_causal, rows=rows)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_dim: int, act: str, ln_eps: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_dim, act, ln_eps) for _ in range(layers))
        # Activation checkpointing trades compute for memory on big micro-batches (set by train.py).
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                pool: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, D] -> [B, L, D]; with `pool` ([B] positions) only those outputs, [B, D] (module docstring)."""
        *body, last = self.blocks
        for block in body:
            x = self.run(block, x, attn_mask, is_causal)
        if pool is None:
            return self.run(last, x, attn_mask, is_causal)
        return self.run(last, x, mask_rows(attn_mask, is_causal, pool, x.shape[1]), False, pool)[:, 0]

    def run(self, block: Block, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool,
            rows: torch.Tensor | None = None) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, attn_mask, is_causal, rows, use_reentrant=False)
        return block(x, attn_mask=attn_mask, is_causal=is_causal, rows=rows)
