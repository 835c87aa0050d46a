"""Parity of har_ref's encoders with transformers' CLIPModel / SiglipModel on the same weights.

Upstream models are built with random weights (seeded), saved with `save_pretrained`,
converted with `weights_conversion hf`, and loaded with `har_ref.load_model`.
Tolerances (fp32) a few times the worst difference measured at the small and the real sizes
(logits are exp(t) ~ 7 times the embeddings' cosines, plus the bias, so they carry ~10x their error).
The differences measured are listed in the "measured" section of the pytest summary.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

import har_ref
from allocations import tensor_allocations
from weights_conversion.hf import convert_hf

EMB_TOL = 1e-6  # max |difference| of L2-normalized embeddings; measured <= 1.8e-7
LOGIT_TOL = 1e-5  # max |difference| of logits; measured <= 2.4e-6
PROJ_TOL = 5e-6  # max |difference| of the projections over their largest entry; measured <= 8.3e-7 (real size)


def randomize(model, seed=0):
    """Weights with unit-scale activations. transformers' own init (std 0.02) leaves
    attention nearly uniform, so a wrong mask or a swapped q/k would hide below 1e-5.
    The logit scalars too: transformers' post-init t = 0 and b = 0 would let a dropped or
    sign-flipped SigLIP bias, or a scale used without exp, through unseen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("logit_scale"):
                p.copy_(2.0 + 0.3 * noise)  # exp(t) ~ 7, as a trained model's (SigLIP starts at log 10)
            elif name.endswith("logit_bias"):
                p.copy_(-3.0 + 0.3 * noise)  # far from 0, as a trained SigLIP's (it starts at -10)
            elif p.ndim >= 2:
                p.copy_(noise * p[0].numel() ** -0.5)  # fan-in scaling
            elif ("norm" in name or "ln_" in name) and name.endswith("weight"):  # LayerNorm (open_clip: ln_*)
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def convert_upstream(model, tmp_path):
    randomize(model)
    src, out = tmp_path / "hf", tmp_path / "har_ref"
    model.save_pretrained(src)
    convert_hf(src, out)
    return har_ref.load_model(out)


def features(output):
    # transformers >= 5 returns a ModelOutput whose pooler_output is the projected feature
    return getattr(output, "pooler_output", output)


def text_batch(vocab: int, length: int, eos_id: int | None, bos_id: int | None, eos_positions, seed=0):
    """Random token ids (never the end or start token) with an end token at each given position and
    padding after it; every row is a different sequence, so a model that mixes up rows, or reads one
    row of the token table for all of them, cannot match upstream by chance. (SigLIP's end token is
    id 1, the smallest id after <pad>: the ids are drawn from the vocabulary without the special ones.)"""
    g = torch.Generator().manual_seed(seed)
    ordinary = torch.tensor([i for i in range(1, vocab) if i not in (eos_id, bos_id)])
    ids = ordinary[torch.randint(len(ordinary), (len(eos_positions), length), generator=g)]
    mask = torch.zeros_like(ids)
    for row, pos in enumerate(eos_positions):
        if bos_id is not None:
            ids[row, 0] = bos_id
        if eos_id is not None:
            ids[row, pos] = eos_id
            ids[row, pos + 1:] = eos_id  # CLIP and SigLIP pad with their end token
        mask[row, :pos + 1] = 1
    assert len({tuple(row) for row in ids.tolist()}) == len(eos_positions)  # distinct sequences
    return ids, mask


def compare(up, ours, pixel_values, input_ids, attention_mask, label, measured):
    """Projections, their directions, and the logits exp(t) cos (+ b) of upstream's own forward, with
    and without the padding mask. The image tower does not see the mask: ours runs it once."""
    if ours.logit_bias is not None:  # a dropped or sign-flipped b moves every logit by |b| or 2|b|
        assert abs(ours.logit_bias.item()) > 1000 * LOGIT_TOL
    up.eval()
    with torch.no_grad():
        up_img, img = features(up.get_image_features(pixel_values=pixel_values)), ours.encode_image(pixel_values)
        for mask in (None, attention_mask):
            up_txt = features(up.get_text_features(input_ids=input_ids, attention_mask=mask))
            up_logits = up(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask).logits_per_image
            txt = ours.encode_text(input_ids, mask)
            logits = ours.logits(img, txt)  # = ours(pixel_values, input_ids, mask)
            d_img = (F.normalize(up_img, dim=-1) - F.normalize(img, dim=-1)).abs().max().item()
            d_txt = (F.normalize(up_txt, dim=-1) - F.normalize(txt, dim=-1)).abs().max().item()
            d_log = (up_logits - logits).abs().max().item()
            # the projections themselves, not only their directions: relative to their largest entry
            d_proj = max(((a - b).abs().max() / a.abs().max()).item() for a, b in ((up_img, img), (up_txt, txt)))
            measured(f"[parity] {label} mask={mask is not None}: image {d_img:.2e}, text {d_txt:.2e}, "
                     f"logits {d_log:.2e}, projections (relative) {d_proj:.2e}")
            assert d_img <= EMB_TOL and d_txt <= EMB_TOL and d_log <= LOGIT_TOL and d_proj <= PROJ_TOL


def small_clip(eos_token_id=99, **vision):
    v = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3,
             image_size=40, patch_size=8)
    v.update(vision)
    return CLIPConfig(
        text_config=dict(hidden_size=40, intermediate_size=72, num_hidden_layers=3, num_attention_heads=5,
                         vocab_size=100, max_position_embeddings=19, eos_token_id=eos_token_id,
                         bos_token_id=98, pad_token_id=eos_token_id),
        vision_config=v, projection_dim=24)


def small_siglip(act="gelu_pytorch_tanh"):
    return SiglipConfig(
        text_config=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                         vocab_size=101, max_position_embeddings=13, hidden_act=act),
        vision_config=dict(hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=6,
                           image_size=36, patch_size=6, hidden_act=act))


@pytest.mark.parametrize("eos_token_id", [99, 2], ids=["eos-first-occurrence", "legacy-argmax"])
def test_clip_small_odd_sizes(tmp_path, eos_token_id, measured):
    torch.manual_seed(0)
    up = CLIPModel(small_clip(eos_token_id))
    ours = convert_upstream(up, tmp_path)
    assert ours.cfg.text.eos_by_argmax == (eos_token_id == 2)
    # legacy rule pools at argmax(ids): the end token must have the largest id, as in CLIP's BPE
    ids, mask = text_batch(100, 19, eos_id=99, bos_id=98, eos_positions=[18, 4, 9, 1])
    x = torch.randn(4, 3, 40, 40)
    compare(up, ours, x, ids, mask, f"CLIP small eos={eos_token_id}", measured)


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu", "quick_gelu"])
def test_siglip_small_odd_sizes(tmp_path, act, measured):
    torch.manual_seed(1)
    up = SiglipModel(small_siglip(act))
    ours = convert_upstream(up, tmp_path)
    ids, mask = text_batch(101, 13, eos_id=1, bos_id=None, eos_positions=[12, 3, 7])
    x = torch.randn(3, 3, 36, 36)
    compare(up, ours, x, ids, mask, f"SigLIP small act={act}", measured)
    # the padding mask really changes SigLIP's text embedding (it attends to padding otherwise)
    with torch.no_grad():
        assert not torch.allclose(ours.encode_text(ids, mask), ours.encode_text(ids))


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_image_tower_inference_holds_no_more_memory_than_upstream(tmp_path, family):
    """Inference keeps one activation alive at a time: the image tower's peak of live tensor bytes
    (exact, from the profiler's allocation events) is at most transformers' on the same weights. It
    fails if the patch embeddings outlive the blocks (held by a name while the blocks run)."""
    torch.manual_seed(2)
    up = (CLIPModel(small_clip()) if family == "clip" else SiglipModel(small_siglip())).eval()
    ours = convert_upstream(up, tmp_path).eval()
    size = up.config.vision_config.image_size
    pixels = torch.randn(8, 3, size, size)
    with torch.no_grad():
        ours_peak = tensor_allocations(lambda: ours.encode_image(pixels))[1]
        upstream_peak = tensor_allocations(lambda: up.get_image_features(pixel_values=pixels))[1]
    assert ours_peak <= upstream_peak, f"{family}: {ours_peak} > {upstream_peak} bytes"


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_position_interpolation_matches_upstream(tmp_path, family, measured):
    torch.manual_seed(2)
    up = CLIPModel(small_clip()) if family == "clip" else SiglipModel(small_siglip())
    ours = convert_upstream(up, tmp_path).eval()
    size = (56, 48) if family == "clip" else (48, 60)  # other sizes, not square
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = features(up.get_image_features(pixel_values=x, interpolate_pos_encoding=True))
        diff = (F.normalize(ref, dim=-1) - F.normalize(ours.encode_image(x), dim=-1)).abs().max().item()
    measured(f"[parity] {family} interpolated positions {size}: image {diff:.2e}")
    assert diff <= EMB_TOL


# tests/conftest.py::real_size: each real-size upstream model is built, saved and converted once per session
@pytest.fixture()
def real_clip(real_size):
    torch.set_rng_state(real_size.rng_state)
    return real_size.up, real_size.ours  # openai/clip-vit-base-patch32's architecture


@pytest.fixture()
def real_siglip(real_size):
    torch.set_rng_state(real_size.rng_state)
    return real_size.up, real_size.ours  # google/siglip-base-patch16-224's architecture, as upstream writes it


@pytest.mark.parametrize("real_size", ["clip"], indirect=True)
def test_clip_real_size(real_clip, measured):
    up, ours = real_clip
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in up.parameters()) == 151_277_313
    ids, mask = text_batch(49408, 77, eos_id=49407, bos_id=49406, eos_positions=[76, 5, 12])
    x = torch.randn(2, 3, 224, 224)  # two images suffice at this size: the small tests cover batches
    compare(up, ours, x, ids, mask, "CLIP ViT-B/32 real size", measured)


@pytest.mark.parametrize("real_size", ["siglip"], indirect=True)
def test_siglip_real_size(real_siglip, measured):
    up, ours = real_siglip
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in up.parameters())
    measured(f"[parity] SigLIP base/16-224 parameters: {count:,}")
    ids, mask = text_batch(32000, 64, eos_id=1, bos_id=None, eos_positions=[63, 6, 15])
    x = torch.randn(2, 3, 224, 224)
    compare(up, ours, x, ids, mask, "SigLIP base/16-224 real size", measured)


@pytest.mark.parametrize("real_size", ["siglip"], indirect=True)
def test_logit_parameters_are_learnable_scalars(real_siglip):
    _, ours = real_siglip
    names = {n for n, _ in ours.named_parameters()}
    assert {"logit_scale", "logit_bias"} <= names
    assert ours.logit_scale.shape == () and ours.logit_bias.shape == ()
    assert not ours.training  # load_model returns eval mode
