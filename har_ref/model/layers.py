"""Transformer building blocks shared by the vision and text towers.

A pre-LayerNorm block (Vaswani et al. 2017, with the pre-norm placement of
Radford et al. 2019) used unchanged by CLIP and SigLIP:
    x = x + Attn(LN1(x));  x = x + MLP(LN2(x))
The families differ only in the MLP activation and the LayerNorm epsilon.

`transformer_at_rows` at the end of the file is a speed shortcut with the same result as
`Transformer` followed by reading one row per sequence; skip it on a first read.
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


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused q, k, v projection (one matmul instead of three)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"config.json: width {width} is not divisible by heads {heads}.")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)  # rows ordered q, k, v
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, L, D = x.shape
        h, d = self.heads, D // self.heads
        # unbind(2) (not a permute to [3, B, h, L, d]): the backward then stacks the q, k, v
        # gradients straight into qkv's [B, L, 3D] layout, saving a copy per block.
        q, k, v = self.qkv(x).view(B, L, 3, h, d).unbind(2)
        # softmax(q k^T / sqrt(d_head) + mask) v  (Vaswani et al. 2017, eq. 1); scale is SDPA's default.
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=attn_mask, is_causal=is_causal)
        return self.out(y.transpose(1, 2).reshape(B, L, D))


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

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.mlp(self.ln2(x))
        return x


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_dim: int, act: str, ln_eps: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_dim, act, ln_eps) for _ in range(layers))
        # Activation checkpointing trades compute for memory on big micro-batches (`--grad-checkpointing`, set in train/setup.py).
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        for block in self.blocks:
            x = self.run(block, x, attn_mask, is_causal)
        return x

    def run(self, fn, *args) -> torch.Tensor:
        """fn(*args), recomputed in the backward instead of storing its activations when checkpointing."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


# ----------------------------------------------------------------------------------------------
# Speed shortcut: the pooled rows only. Same result as the plain path, skip on a first read.

def transformer_at_rows(transformer: Transformer, x: torch.Tensor, rows: torch.Tensor,
                        attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """transformer(x, attn_mask, is_causal)[b, rows[b]] for each sequence b: [B, L, D], [B] -> [B, D].

    Every tower but SigLIP's image tower reads one row of its last block (class token, end-of-text
    token, last token). A block computes each output row from the whole input but independently of
    the other output rows, so the last block runs for the pooled row only: keys and values still
    come from every position, while the query projection, attention output, MLP and their backward
    shrink from L rows to one. The earlier blocks run as in `Transformer.forward`. What it saves:
    tests/bench/bench_shortcuts.py measures it, docs/benchmarks.md has the figures.
    """
    *body, last = transformer.blocks
    for block in body:
        x = transformer.run(block, x, attn_mask, is_causal)
    B, L, _ = x.shape
    batch = torch.arange(B, device=x.device)
    if is_causal:  # a query at position p sees keys 0..p
        attn_mask = (torch.arange(L, device=x.device) <= rows[:, None]).view(B, 1, 1, L)
    elif attn_mask is not None and attn_mask.shape[2] > 1:  # one mask row per query: keep the pooled ones
        attn_mask = attn_mask[batch, :, rows].unsqueeze(2)
    return transformer.run(_block_at_rows, last, x, rows, attn_mask)


def _block_at_rows(block: Block, x: torch.Tensor, rows: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """Block.forward(x)[b, rows[b]] for each b, with `attn_mask` already cut to those queries ([B, 1, 1, L])."""
    B, L, D = x.shape
    h, d = block.attn.heads, D // block.attn.heads
    batch = torch.arange(B, device=x.device)
    w_q, w_kv = block.attn.qkv.weight.split([D, 2 * D])
    b_q, b_kv = block.attn.qkv.bias.split([D, 2 * D])
    normed = block.ln1(x)
    q = F.linear(normed[batch, rows].unsqueeze(1), w_q, b_q).view(B, 1, h, d)
    k, v = F.linear(normed, w_kv, b_kv).view(B, L, 2, h, d).unbind(2)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
    x = x[batch, rows].unsqueeze(1) + block.attn.out(y.transpose(1, 2).reshape(B, 1, D))
    x = x + block.mlp(block.ln2(x))
    return x[:, 0]
