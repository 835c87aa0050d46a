"""Per-patch maps of where an image tower looks, each a distribution over the patches.

    SigLIP : probe attention, the MAP head's softmax weights over the patches (per head, and their mean)
    CLIP   : attention rollout of the class token through every block (Abnar & Zuidema 2020, eq. 1)
    both   : a class-specific map for the score of class c, gradient-weighted attention (Chefer et al. 2021)

The training path keeps its fused attention (SDPA never forms the probabilities). `trace_image_tower`
recomputes the image tower from the same modules and weights with the probabilities written out as
tensors, which autograd reaches for the class-specific maps; the model itself is not touched. What a
map is and is not (attention is not an explanation) is in docs/explain.md.

The second half maps a patch grid back onto the image the user gave (through the eval transform's
resize and crop) and scores a map against a box (the pointing game).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..model.config import ModelConfig
from ..model.dual_encoder import DualEncoder
from ..model.layers import SelfAttention
from ..model.transforms import resize_geometry
from ..model.vision import AttentionPoolingHead, VisionTransformer

ATTENTION_MAP_NAMES = {"clip": "attention rollout", "siglip": "probe attention (head mean)"}


@dataclass
class Trace:
    """The image tower's output and the attention probabilities its maps are made of."""

    embedding: torch.Tensor  # [B, D], projected, as encode_image returns it
    blocks: list[torch.Tensor]  # CLIP: per block [B, heads, L, L], token 0 the class token; SigLIP: [] (unused)
    probe: torch.Tensor | None  # SigLIP: the MAP probe's weights over the patches [B, heads, N]; CLIP: None
    grid: tuple[int, int]  # patch rows, patch columns


def self_attention(attn: SelfAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SelfAttention.forward(x) with its probabilities [B, h, L, L] formed: softmax(q k^T / sqrt(d)) v
    (Vaswani et al. 2017, eq. 1)."""
    B, L, D = x.shape
    h, d = attn.heads, D // attn.heads
    q, k, v = attn.qkv(x).view(B, L, 3, h, d).permute(2, 0, 3, 1, 4)  # each [B, h, L, d]
    probs = (q @ k.transpose(-2, -1) * d**-0.5).softmax(-1)
    return attn.out((probs @ v).transpose(1, 2).reshape(B, L, D)), probs


def probe_attention(head: AttentionPoolingHead, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AttentionPoolingHead.forward(x) with the probe's probabilities over the N tokens [B, h, N] formed."""
    B, N, D = x.shape
    h, d = head.heads, D // head.heads
    w_q, w_kv = head.in_proj_weight.split([D, 2 * D])
    b_q, b_kv = head.in_proj_bias.split([D, 2 * D])
    q = F.linear(head.probe[0, 0], w_q, b_q).view(h, d)
    k, v = F.linear(x, w_kv, b_kv).view(B, N, 2, h, d).unbind(2)  # each [B, N, h, d]
    probs = (torch.einsum("hd,bnhd->bhn", q, k) * d**-0.5).softmax(-1)
    y = head.out_proj(torch.einsum("bhn,bnhd->bhd", probs, v).reshape(B, 1, D))
    y = y + head.mlp(head.ln(y))
    return y[:, 0], probs


def trace_image_tower(vision: VisionTransformer, pixels: torch.Tensor) -> Trace:
    """VisionTransformer.forward(pixels) as clip_path / siglip_path, keeping the probabilities the maps need:
    CLIP's in every block (rollout), SigLIP's in its head only (its blocks run as in the model, fused)."""
    p = vision.cfg.patch_size
    grid = (pixels.shape[-2] // p, pixels.shape[-1] // p)
    x = vision.embed_patches(pixels)
    positions = vision.position_embedding(*grid).to(x.dtype)
    if vision.cfg.pool != "cls":
        embedding, probe = probe_attention(vision.head, vision.ln_post(vision.transformer(x + positions)))
        return Trace(embedding, [], probe, grid)
    B, _, D = x.shape
    x = vision.ln_pre(torch.cat([vision.class_token.expand(B, 1, D).to(x.dtype), x], dim=1) + positions)
    blocks = []
    for block in vision.transformer.blocks:
        y, probs = self_attention(block.attn, block.ln1(x))
        x = x + y
        x = x + block.mlp(block.ln2(x))
        blocks.append(probs)
    return Trace(vision.proj(vision.ln_post(x[:, 0])), blocks, None, grid)


# ---------------------------------------------------------------------------------------------- maps


def distribution(relevance: torch.Tensor) -> torch.Tensor:
    """[..., N] non-negative -> rows summing to 1. A row with no relevance anywhere (all zero) becomes
    uniform: it then says nothing, and every map stays a distribution over the patches."""
    total = relevance.sum(-1, keepdim=True)
    return torch.where(total > 0, relevance / total.clamp_min(torch.finfo(relevance.dtype).tiny),
                       torch.full_like(relevance, 1 / relevance.shape[-1]))


def rollout(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout of the class token (token 0) over the patches: [B, h, L, L] per block -> [B, L-1].

    Abnar & Zuidema 2020, eq. 1: per block A_hat = 0.5 A + 0.5 I (A the head mean: the residual stream
    carries half), rows renormalized; rolled out R = A_hat_L ... A_hat_1. The class token's row of R
    without its own entry, renormalized over the patches.
    """
    eye = torch.eye(blocks[0].shape[-1], dtype=blocks[0].dtype, device=blocks[0].device)
    R = eye
    for A in blocks:
        A_hat = 0.5 * A.mean(1) + 0.5 * eye
        R = (A_hat / A_hat.sum(-1, keepdim=True)) @ R
    return distribution(R[:, 0, 1:])


def gradient_rollout(blocks: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Class-specific relevance of the class token over the patches (Chefer et al. 2021, eqs. 5-6 for
    self-attention): per block A_bar = E_h[(grad A * A)^+], R = R + A_bar R from R = I. -> [B, L-1]."""
    R = torch.eye(blocks[0].shape[-1], dtype=blocks[0].dtype, device=blocks[0].device)
    for A, G in zip(blocks, grads):
        R = R + (G * A).clamp_min(0).mean(1) @ R
    return distribution(R[:, 0, 1:])


def _as_grid(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return maps.reshape(*maps.shape[:-1], *grid)


@torch.no_grad()
def head_maps(model: DualEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """SigLIP: each head's probe attention over the patches, [B, heads, grid_h, grid_w]."""
    if model.cfg.family != "siglip":
        raise ValueError("per-head probe maps exist for SigLIP (the MAP head) only; use attention_map for CLIP.")
    trace = trace_image_tower(model.vision, pixels)
    return _as_grid(trace.probe, trace.grid)


def traced_attention_map(trace: Trace) -> torch.Tensor:
    """attention_map of a traced forward: SigLIP's probe attention (head mean), CLIP's rollout."""
    maps = trace.probe.mean(1) if trace.probe is not None else rollout(trace.blocks)
    return _as_grid(maps, trace.grid)


@torch.no_grad()
def attention_map(model: DualEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """[B, grid_h, grid_w], each summing to 1: SigLIP's probe attention (head mean), CLIP's rollout."""
    return traced_attention_map(trace_image_tower(model.vision, pixels))


def class_maps(model: DualEncoder, pixels: torch.Tensor, class_emb: torch.Tensor,
               classes: Sequence[int | torch.Tensor]) -> list[torch.Tensor]:
    """One class-specific map [B, grid_h, grid_w] per entry of `classes` (a class index, or one per image [B]).

    The class score is the one evaluate uses: DualEncoder.score of the unit image embedding against
    the class embeddings (embed.py::class_embeddings, computed once by the caller). CLIP: gradient
    rollout through every block; SigLIP: the probe attention weighted by its gradient, E_h[(grad A * A)^+]
    (Chefer et al. 2021 applied to the head that pools the image). One forward, one backward per class;
    the gradients go to the probabilities only, so no parameter's .grad is written.
    """
    if not classes:
        return []
    with torch.enable_grad():  # pixels that need a gradient: the graph exists even with frozen weights
        trace = trace_image_tower(model.vision, pixels.detach().requires_grad_())
        scores = model.score(F.normalize(trace.embedding.float(), dim=-1), class_emb)
        attended = trace.blocks if trace.probe is None else [trace.probe]
        batch = torch.arange(len(pixels), device=scores.device)
        maps = []
        for i, c in enumerate(classes):
            target = scores[batch, torch.as_tensor(c, device=scores.device).expand(len(pixels))].sum()
            grads = torch.autograd.grad(target, attended, retain_graph=i < len(classes) - 1)
            if trace.probe is None:
                relevance = gradient_rollout([A.detach() for A in attended], grads)
            else:
                relevance = distribution((grads[0] * trace.probe.detach()).clamp_min(0).mean(1))
            maps.append(_as_grid(relevance, trace.grid))
    return maps


# ------------------------------------------------------------------------ maps on the user's image


def patch_edges(image_size: tuple[int, int], cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """The patch grid's column and row edges in the original image's pixel coordinates, through the
    eval transform's resize and crop (model/transforms.py::resize_geometry): ([grid_w + 1], [grid_h + 1])."""
    width, height = image_size
    (new_w, new_h), (left, top) = resize_geometry(width, height, cfg)
    steps = cfg.vision.patch_size * np.arange(cfg.vision.image_size // cfg.vision.patch_size + 1)
    return (left + steps) * width / new_w, (top + steps) * height / new_h


def coverage(edges: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """[len(starts), len(edges) - 1]: the fraction of each patch interval inside each [start, end]."""
    lo = np.maximum(starts[:, None], edges[None, :-1])
    hi = np.minimum(ends[:, None], edges[None, 1:])
    return np.clip(hi - lo, 0, None) / np.diff(edges)[None, :]


def spread(rows: np.ndarray, patch_map: torch.Tensor | np.ndarray, cols: np.ndarray) -> np.ndarray:
    """rows @ patch_map @ cols.T in float64: the mass of each (row interval, column interval) cell.
    einsum, not @: for matrices this small, OpenBLAS's thread start-up costs more than the products."""
    return np.einsum("yq,xq->yx", np.einsum("yp,pq->yq", rows, np.asarray(patch_map, dtype=np.float64)), cols)


def pixel_mass(patch_map: torch.Tensor | np.ndarray, image_size: tuple[int, int], cfg: ModelConfig,
               out_size: tuple[int, int] | None = None) -> np.ndarray:
    """A [grid_h, grid_w] map spread over the image as mass per pixel, [height, width] of `out_size`
    (default: the image's size; a smaller out_size is the same image drawn smaller).

    Each patch's mass is spread evenly over the part of the image it was cut from, so the total is
    kept (1, up to rounding) and maps of different grids are comparable pixel for pixel. Outside
    CLIP's centre crop the mass is 0: the model never saw those pixels.
    """
    width, height = image_size
    out_w, out_h = out_size or image_size
    xs, ys = patch_edges(image_size, cfg)
    cols, rows = np.arange(out_w) * width / out_w, np.arange(out_h) * height / out_h
    cx = coverage(xs, cols, cols + width / out_w)
    cy = coverage(ys, rows, rows + height / out_h)
    return spread(cy, patch_map, cx)


def box_shares(maps: np.ndarray, boxes: np.ndarray, image_size: tuple[int, int], cfg: ModelConfig) -> np.ndarray:
    """The share of each map's mass inside its pixel box [x0, y0, x1, y1] of the original image (corners in
    pixel coordinates: a box of whole pixels x0..x1-1 has x1 as its right edge), after pixel_mass's spreading.
    maps [n, grid_h, grid_w] and boxes [n, 4] of n images of one size -> [n]."""
    x0, y0, x1, y1 = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).T
    xs, ys = patch_edges(image_size, cfg)
    return np.einsum("ny,nyx,nx->n", coverage(ys, y0, y1), np.asarray(maps, np.float64), coverage(xs, x0, x1))


def box_share(patch_map: torch.Tensor | np.ndarray, box: Sequence[float], image_size: tuple[int, int],
              cfg: ModelConfig) -> float:
    """box_shares of one [grid_h, grid_w] map and one box."""
    return float(box_shares(np.asarray(patch_map)[None], np.asarray([box]), image_size, cfg)[0])


def pointing_game(maps: torch.Tensor, boxes: Sequence[Sequence[float] | None], image_sizes: Sequence[tuple[int, int]],
                  cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """(share of each map's mass inside its image's box, the uniform map's share) as two [B] arrays.

    maps [B, grid_h, grid_w] from one model (`cfg` its config); boxes in each image's pixel coordinates,
    None where the image has no such box (NaN in both arrays). The uniform map puts the same mass on
    every patch: its share is the box's share of the area the model sees (for a square image, or
    SigLIP's squashing resize, the box's share of the image area).
    """
    maps = maps.detach().cpu().double().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps, np.float64)
    if not len(maps) == len(boxes) == len(image_sizes):
        raise ValueError(f"pointing_game needs one box and one image size per map, got {len(maps)} maps, "
                         f"{len(boxes)} boxes and {len(image_sizes)} sizes.")
    uniform = np.full(maps.shape[1:], 1 / maps[0].size)
    shares, baseline = np.full(len(maps), np.nan), np.full(len(maps), np.nan)
    by_size: dict[tuple[int, int], list[int]] = {}  # images of one size share their patch edges: one product
    for i, box in enumerate(boxes):
        if box is not None:
            by_size.setdefault(tuple(image_sizes[i]), []).append(i)
    for size, rows in by_size.items():
        sized = np.array([boxes[i] for i in rows], dtype=np.float64)
        shares[rows] = box_shares(maps[rows], sized, size, cfg)
        baseline[rows] = box_shares(np.broadcast_to(uniform, (len(rows), *uniform.shape)), sized, size, cfg)
    return shares, baseline
