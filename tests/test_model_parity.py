"""Parity of har_ref's encoders with transformers' CLIPModel / SiglipModel on the same weights.

Upstream models are built with random weights (seeded), saved with `save_pretrained`,
converted with `weights_conversion hf`, and loaded with `har_ref.load_model`.
Tolerance (fp32): max |difference| of L2-normalized embeddings <= 1e-5, logits <= 1e-4
(logits are scaled by exp(logit_scale) and shifted by the bias, so they carry ~100x the
embedding error). The differences measured are listed in the "measured" section of the pytest summary.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel  # noqa: E402

import har_ref  # noqa: E402
from weights_conversion.hf import convert_hf  # noqa: E402

EMB_TOL = 1e-5
LOGIT_TOL = 1e-4


def randomize(model, seed=0):
    """Weights with unit-scale activations. transformers' own init (std 0.02) leaves
    attention nearly uniform, so a wrong mask or a swapped q/k would hide below 1e-5."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale") or name.endswith("logit_bias"):
                continue
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(noise * p[0].numel() ** -0.5)  # fan-in scaling
            elif "norm" in name and name.endswith("weight"):
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


def upstream_features(up, pixel_values, input_ids, attention_mask):
    img = up.get_image_features(pixel_values=pixel_values)
    txt = up.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    # transformers >= 5 returns a ModelOutput whose pooler_output is the projected feature
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    return img, txt


def text_batch(vocab: int, length: int, eos_id: int | None, bos_id: int | None, eos_positions, seed=0):
    """Random token ids with an end token at each given position, padding after it."""
    g = torch.Generator().manual_seed(seed)
    top = min(vocab, eos_id if eos_id is not None else vocab) - 2
    ids = torch.randint(1, max(top, 2), (len(eos_positions), length), generator=g)
    mask = torch.zeros_like(ids)
    for row, pos in enumerate(eos_positions):
        if bos_id is not None:
            ids[row, 0] = bos_id
        if eos_id is not None:
            ids[row, pos] = eos_id
            ids[row, pos + 1:] = eos_id  # CLIP pads with <|endoftext|>
        mask[row, :pos + 1] = 1
    return ids, mask


def compare(up, ours, pixel_values, input_ids, attention_mask, label, measured):
    up.eval()
    with torch.no_grad():
        for mask in (None, attention_mask):
            up_img, up_txt = upstream_features(up, pixel_values, input_ids, mask)
            up_logits = up(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask).logits_per_image
            img, txt = ours.encode_image(pixel_values), ours.encode_text(input_ids, mask)
            logits = ours(pixel_values, input_ids, mask)
            d_img = (F.normalize(up_img, dim=-1) - F.normalize(img, dim=-1)).abs().max().item()
            d_txt = (F.normalize(up_txt, dim=-1) - F.normalize(txt, dim=-1)).abs().max().item()
            d_log = (up_logits - logits).abs().max().item()
            measured(f"[parity] {label} mask={mask is not None}: image {d_img:.2e}, text {d_txt:.2e}, "
                     f"logits {d_log:.2e}")
            assert d_img <= EMB_TOL and d_txt <= EMB_TOL and d_log <= LOGIT_TOL
            # the projections themselves, not only their directions
            torch.testing.assert_close(img, up_img, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(txt, up_txt, atol=1e-4, rtol=1e-4)


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
def test_position_interpolation_matches_upstream(tmp_path, family, measured):
    torch.manual_seed(2)
    up = CLIPModel(small_clip()) if family == "clip" else SiglipModel(small_siglip())
    ours = convert_upstream(up, tmp_path).eval()
    size = (56, 48) if family == "clip" else (48, 60)  # other sizes, not square
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = up.get_image_features(pixel_values=x, interpolate_pos_encoding=True)
        ref = getattr(ref, "pooler_output", ref)
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
    assert ours.num_params() == sum(p.numel() for p in up.parameters()) == 151_277_313
    ids, mask = text_batch(49408, 77, eos_id=49407, bos_id=49406, eos_positions=[76, 5, 12])
    x = torch.randn(3, 3, 224, 224)
    compare(up, ours, x, ids, mask, "CLIP ViT-B/32 real size", measured)


@pytest.mark.parametrize("real_size", ["siglip"], indirect=True)
def test_siglip_real_size(real_siglip, measured):
    up, ours = real_siglip
    assert ours.num_params() == sum(p.numel() for p in up.parameters())
    measured(f"[parity] SigLIP base/16-224 parameters: {ours.num_params():,}")
    ids, mask = text_batch(32000, 64, eos_id=1, bos_id=None, eos_positions=[63, 6, 15])
    x = torch.randn(3, 3, 224, 224)
    compare(up, ours, x, ids, mask, "SigLIP base/16-224 real size", measured)


@pytest.mark.parametrize("real_size", ["siglip"], indirect=True)
def test_logit_parameters_are_learnable_scalars(real_siglip):
    _, ours = real_siglip
    names = {n for n, _ in ours.named_parameters()}
    assert {"logit_scale", "logit_bias"} <= names
    assert ours.logit_scale.shape == () and ours.logit_bias.shape == ()
    assert not ours.training  # load_model returns eval mode
