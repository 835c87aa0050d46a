"""Vision Transformer (Dosovitskiy et al. 2021) configured as CLIP's or SigLIP's image tower.

    CLIP   : patches (no bias) + [class] token + pos -> ln_pre -> blocks -> ln_post([class]) -> proj
    SigLIP : patches (bias)                 + pos -> blocks -> ln_post -> attention-pooling head (MAP)

The switches live in VisionConfig.pool ("cls" | "map") and VisionConfig.patch_bias.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import VisionConfig
from .layers import MLP, Transformer


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
        width = cfg.width
        self.patch_embed = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                                     bias=cfg.patch_bias)
        grid = cfg.image_size // cfg.patch_size
        num_tokens = grid * grid + (1 if cfg.pool == "cls" else 0)
        self.pos_embed = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        if cfg.pool == "cls":
            self.class_token = nn.Parameter(torch.randn(width) * width**-0.5)
            self.ln_pre = nn.LayerNorm(width, eps=cfg.ln_eps)
        elif cfg.pool != "map":
            raise ValueError(f"config.json: vision.pool must be 'cls' or 'map', got {cfg.pool!r}.")
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.act, cfg.ln_eps)
        self.ln_post = nn.LayerNorm(width, eps=cfg.ln_eps)
        if cfg.pool == "cls":
            self.proj = nn.Linear(width, embed_dim, bias=False)
        else:
            # SigLIP has no projection: the MAP head's output is the embedding.
            if embed_dim != width:
                raise ValueError(f"config.json: SigLIP embed_dim ({embed_dim}) must equal vision width ({width}).")
            self.head = AttentionPoolingHead(width, cfg.heads, cfg.mlp_dim, cfg.act, cfg.ln_eps)

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings for a grid_h x grid_w patch grid.

        At the trained size this is the stored table. Otherwise the patch part is
        resized bicubically, exactly as transformers' `interpolate_pos_encoding`
        (the class-token position, if any, is kept as is).
        """
        grid = self.cfg.image_size // self.cfg.patch_size
        if (grid_h, grid_w) == (grid, grid):
            return self.pos_embed
        has_cls = self.cfg.pool == "cls"
        patch_pos = self.pos_embed[1:] if has_cls else self.pos_embed
        D = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, grid, grid, D).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid_h * grid_w, D)
        return torch.cat([self.pos_embed[:1], patch_pos]) if has_cls else patch_pos

    def embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, gh*gw, D]: each p x p patch, flattened, times E (ViT eq. 1).

        E is stored as the equivalent stride-p Conv2d's weight [D, C, p, p] (upstream's layout), but
        applied as one matmul: on the CPU the convolution's backward allocates ~60 MiB of oneDNN
        buffers for ViT-B/32, the matmul's nothing. Like the convolution, it drops a partial last patch.
        """
        p = self.cfg.patch_size
        B, C, H, W = pixel_values.shape
        gh, gw = H // p, W // p
        patches = pixel_values[:, :, :gh * p, :gw * p].reshape(B, C, gh, p, gw, p)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * p * p)  # rows in (c, y, x) order
        weight = self.patch_embed.weight
        return F.linear(patches.to(weight.dtype), weight.flatten(1), self.patch_embed.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        p = self.cfg.patch_size
        gh, gw = pixel_values.shape[-2] // p, pixel_values.shape[-1] // p
        if torch.is_grad_enabled():
            # The backward recomputes the patch copy instead of keeping it: like a convolution, the
            # step then holds only the pixels, which the caller holds anyway.
            x = checkpoint(self.embed_patches, pixel_values, use_reentrant=False, preserve_rng_state=False)
        else:
            x = self.embed_patches(pixel_values)
        B, _, D = x.shape
        if self.cfg.pool == "cls":
            x = torch.cat([self.class_token.expand(B, 1, D).to(x.dtype), x], dim=1)
        x = x + self.position_embedding(gh, gw).to(x.dtype)
        if self.cfg.pool == "map":
            return self.head(self.ln_post(self.transformer(x)))  # SigLIP: the head attends to every token
        x = self.ln_pre(x)  # rebinding x frees the pre-norm activations before the blocks run
        # CLIP reads only the class token (position 0): the last block computes just that row (layers.py).
        cls = self.transformer(x, pool=torch.zeros(B, dtype=torch.long, device=x.device))
        return self.proj(self.ln_post(cls))
