"""Vision Transformer (Dosovitskiy et al. 2021) configured as CLIP's or SigLIP's image tower.

    CLIP   : patches (no bias) + [class] token + pos -> ln_pre -> blocks -> ln_post([class]) -> proj
    SigLIP : patches (bias)                 + pos -> blocks -> ln_post -> attention-pooling head (MAP)

The switches live in VisionConfig.pool ("cls" | "map") and VisionConfig.patch_bias; `__init__`
reads the first once and picks the tower's path, `clip_path` or `siglip_path`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import VisionConfig
from .layers import MLP, Transformer, transformer_at_rows


class AttentionPoolingHead(nn.Module):
    """SigLIP's multi-head attention pooling (MAP, Lee et al. 2019 "Set Transformer"; Zhai et al. 2022).

    A learned probe query attends over all patch tokens, followed by a residual MLP.
    Parameter layout mirrors torch.nn.MultiheadAttention (fused in_proj, q|k|v rows),
    which is what upstream uses, but the computation is one SDPA call.
    """

    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, ln_eps: float):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.zeros(1, 1, width))
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.ln = nn.LayerNorm(width, eps=ln_eps)
        self.mlp = MLP(width, mlp_dim, act)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.normal_(self.probe, std=width**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        h = self.heads
        w_q, w_kv = self.in_proj_weight.split([D, 2 * D])
        b_q, b_kv = self.in_proj_bias.split([D, 2 * D])
        q = F.linear(self.probe, w_q, b_q).view(1, 1, h, D // h).transpose(1, 2).expand(B, -1, -1, -1)
        k, v = F.linear(x, w_kv, b_kv).view(B, N, 2, h, D // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # [B, h, 1, D/h]
        y = self.out_proj(y.transpose(1, 2).reshape(B, 1, D))
        y = y + self.mlp(self.ln(y))
        return y[:, 0]


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        width, grid = cfg.width, cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                                     bias=cfg.patch_bias)
        if cfg.pool not in ("cls", "map"):
            raise ValueError(f"config.json: vision.pool must be 'cls' or 'map', got {cfg.pool!r}.")
        if cfg.pool == "map" and embed_dim != width:  # SigLIP has no projection: the head's output is the embedding
            raise ValueError(f"config.json: SigLIP embed_dim ({embed_dim}) must equal vision width ({width}).")
        clip = cfg.pool == "cls"
        # The parameters are made in this order in both families (the optimizer's order, and that of
        # the random draws): the class token's parts before the blocks, the head after them.
        self.pos_embed = nn.Parameter(torch.randn(grid * grid + clip, width) * 0.02)  # CLIP: + the class token's
        if clip:
            self.class_token = nn.Parameter(torch.randn(width) * width**-0.5)
            self.ln_pre = nn.LayerNorm(width, eps=cfg.ln_eps)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.act, cfg.ln_eps)
        self.ln_post = nn.LayerNorm(width, eps=cfg.ln_eps)
        if clip:
            self.proj = nn.Linear(width, embed_dim, bias=False)
            self.path = self.clip_path
        else:
            self.head = AttentionPoolingHead(width, cfg.heads, cfg.mlp_dim, cfg.act, cfg.ln_eps)
            self.path = self.siglip_path

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, embed_dim]: the patch embeddings (ViT eq. 1), then the family's path."""
        p = self.cfg.patch_size
        positions = self.position_embedding(pixel_values.shape[-2] // p, pixel_values.shape[-1] // p)
        # each p x p patch, flattened, times E: [B, N, D]; passed on without a name here, so that the
        # paths' rebinding of x frees it (inference keeps one activation alive at a time)
        return self.path(self.embed_patches(pixel_values), positions)

    def clip_path(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """CLIP: ln_pre([class; patches] + pos) -> blocks -> the class token's state -> ln_post -> proj."""
        B, _, D = x.shape
        x = torch.cat([self.class_token.expand(B, 1, D).to(x.dtype), x], dim=1) + positions.to(x.dtype)
        x = self.ln_pre(x)
        # self.transformer(x)[:, 0], computing only the class token's row in the last block (layers.py).
        cls = transformer_at_rows(self.transformer, x, torch.zeros(B, dtype=torch.long, device=x.device))
        return self.proj(self.ln_post(cls))

    def siglip_path(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """SigLIP: patches + pos -> blocks -> ln_post -> the MAP head, which attends to every token."""
        x = x + positions.to(x.dtype)  # rebinding x frees the patches before the blocks run (as in clip_path)
        x = self.transformer(x)
        return self.head(self.ln_post(x))

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings for a grid_h x grid_w patch grid.

        At the trained size this is the stored table. Otherwise the patch part is
        resized bicubically, exactly as transformers' `interpolate_pos_encoding`
        (the class-token position, if any, is kept as is).
        """
        grid = self.cfg.image_size // self.cfg.patch_size
        if (grid_h, grid_w) == (grid, grid):
            return self.pos_embed
        prefix, patch_pos = self.pos_embed.split([len(self.pos_embed) - grid * grid, grid * grid])  # [class], grid
        D = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, grid, grid, D).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return torch.cat([prefix, patch_pos.permute(0, 2, 3, 1).reshape(grid_h * grid_w, D)])

    # ------------------------------------------------------------------------------------------
    # Memory shortcut: the patch embedding as a matmul. Same result as the convolution.

    def embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """self.patch_embed(pixel_values).flatten(2).transpose(1, 2): [B, C, H, W] -> [B, gh*gw, D].

        E is stored as the equivalent stride-p Conv2d's weight [D, C, p, p] (upstream's layout), but
        applied as one matmul over the flattened patches, and under a checkpoint whose backward
        recomputes the patch copy instead of keeping it: the step then holds only the pixels, which
        the caller holds anyway. On the CPU the convolution's backward allocates oneDNN buffers the
        matmul does not. Like the convolution, it drops a partial last patch. What it saves:
        tests/bench/bench_shortcuts.py measures it, docs/benchmarks.md has the figures.
        """
        weight, bias = self.patch_embed.weight, self.patch_embed.bias
        if torch.is_grad_enabled():
            return checkpoint(_patches_times_weight, pixel_values, weight, bias, use_reentrant=False,
                              preserve_rng_state=False)
        return _patches_times_weight(pixel_values, weight, bias)


def _patches_times_weight(pixel_values: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The stride-p convolution with weight [D, C, p, p] as a matmul of the flattened patches."""
    p = weight.shape[-1]
    B, C, H, W = pixel_values.shape
    gh, gw = H // p, W // p
    patches = pixel_values[:, :, :gh * p, :gw * p].reshape(B, C, gh, p, gw, p)
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * p * p)  # rows in (c, y, x) order
    return F.linear(patches.to(weight.dtype), weight.flatten(1), bias)
