"""Transformer building blocks shared by the vision and text towers.

A pre-LayerNorm block (Vaswani et al. 2017, with the pre-norm placement of
Radford et al. 2019) used unchanged by CLIP and SigLIP:
    x = x + Attn(LN1(x));  x = x + MLP(LN2(x))
The families differ only in the MLP activation and the LayerNorm epsilon.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x).
    return x * torch.sigmoid(1.702 * x)


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

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        # softmax(q k^T / sqrt(d_head) + mask) v  (Vaswani et al. 2017, eq. 1); scale is SDPA's default.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
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

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        x = x + self.attn(self.ln1(x), attn_mask=attn_mask, is_causal=is_causal)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_dim: int, act: str, ln_eps: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_dim, act, ln_eps) for _ in range(layers))
        # Activation checkpointing trades compute for memory on big micro-batches (set by train.py).
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask, is_causal, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)
        return x
