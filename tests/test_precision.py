"""bf16 autocast (training and evaluation on a CPU with avx512_bf16, or a GPU) keeps the embeddings'
directions: cosine similarity between the bf16-autocast and the fp32 L2-normalized embeddings.

Model: both families at a small-but-not-tiny size (6 layers per tower, vision width 384 on 36
patches + class token, text width 256 on 32 positions), random weights with fan-in scaling so
that activations are unit-scale and attention is far from uniform (a harder case than the
pretrained models' well-conditioned weights); 8 images and 8 texts.
Tolerance: cosine >= 0.9999 for every image and text embedding, about twice the worst 1 - cos
measured (4.8e-5); the bf16 zero-shot argmax (image x text logits) must agree with fp32's on this batch.
The loss is not part of this: har_ref/train/loop.py::contrastive_loss computes it in fp32.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from har_ref.model.config import clip_vit_b32, siglip_base_patch16_224
from har_ref.model.dual_encoder import DualEncoder
from har_ref.train.optim import autocast

COS_TOL = 0.9999  # min cosine measured: CLIP image 0.999952, text 0.999964; SigLIP 0.999974, 0.999965
SMALL_VISION = dict(image_size=96, patch_size=16, width=384, layers=6, heads=6, mlp_dim=1536)
SMALL_TEXT = dict(vocab_size=1000, context_length=32, width=256, layers=6, heads=4, mlp_dim=1024,
                  eos_token_id=999, pad_token_id=999)


pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(family: str) -> DualEncoder:
    base = clip_vit_b32() if family == "clip" else siglip_base_patch16_224()
    text = dict(SMALL_TEXT) if family == "clip" else {**SMALL_TEXT, "eos_token_id": 1, "pad_token_id": 1}
    embed_dim = 192 if family == "clip" else SMALL_VISION["width"]  # SigLIP: the MAP head's width
    cfg = replace(base, embed_dim=embed_dim, vision=replace(base.vision, **SMALL_VISION),
                  text=replace(base.text, **text))
    torch.manual_seed(0)
    model = DualEncoder(cfg).eval()
    with torch.no_grad():  # fan-in scaled weights: unit-scale activations, peaked attention
        for name, p in model.named_parameters():
            if name.startswith("logit_"):
                continue
            noise = torch.randn_like(p)
            if p.ndim >= 2:
                p.copy_(noise * p[0].numel() ** -0.5)
            elif "ln" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def inputs(model: DualEncoder):
    torch.manual_seed(1)
    t = model.cfg.text
    ids = torch.randint(2, t.vocab_size - 1, (8, t.context_length))
    if model.cfg.family == "clip":
        for row, end in enumerate([31, 5, 9, 12, 20, 7, 15, 3]):  # end-of-text, then padding
            ids[row, end:] = t.eos_token_id
    pixels = torch.randn(8, 3, model.cfg.vision.image_size, model.cfg.vision.image_size)
    return pixels, ids


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_bf16_autocast_embeddings_stay_close_to_fp32(family, measured):
    model = small_model(family)
    pixels, ids = inputs(model)
    cpu = torch.device("cpu")
    with torch.no_grad():
        fp32 = model.encode_image(pixels), model.encode_text(ids)
        with autocast("bf16", cpu):
            bf16 = model.encode_image(pixels), model.encode_text(ids)
    assert bf16[0].dtype == torch.bfloat16  # autocast really ran the matmuls in bf16
    cos = [F.cosine_similarity(a.float(), b, dim=-1) for a, b in zip(bf16, fp32)]
    measured(f"precision {family}: bf16 vs fp32 embedding cosine, image min {cos[0].min():.6f}, "
             f"text min {cos[1].min():.6f} (tolerance {COS_TOL})")
    assert cos[0].min() >= COS_TOL and cos[1].min() >= COS_TOL
    # not vacuous: bf16 did change the numbers
    assert (bf16[0].float() - fp32[0]).abs().max() > 1e-4
    logits_fp32 = model.logits(*fp32)
    logits_bf16 = model.logits(*(e.float() for e in bf16))
    assert torch.equal(logits_bf16.argmax(dim=1), logits_fp32.argmax(dim=1))
