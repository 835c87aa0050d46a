"""The demo's shipped pretrained tiny checkpoints (har_ref/demo/checkpoints, written by `make pretrain`):
in transformers' format, they load in transformers with no missing or unused weights, convert with
`weights_conversion hf`, give the same embeddings both ways, and match their manifest's sha256."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
import transformers

from har_ref import load_model, load_tokenizer
from har_ref.demo.tiny import CHECKPOINTS
from weights_conversion.hf import convert_hf

MANIFEST = json.loads((CHECKPOINTS / "manifest.json").read_text())


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_files_match_the_manifest(family):
    files = MANIFEST["models"][family]["sha256"]
    assert sorted(files) == sorted(p.name for p in (CHECKPOINTS / family).iterdir())
    for name, digest in files.items():
        assert hashlib.sha256((CHECKPOINTS / family / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_transformers_loads_them_and_agrees_with_the_converted_checkpoint(family, tmp_path, measured):
    upstream_cls = transformers.CLIPModel if family == "clip" else transformers.SiglipModel
    upstream, info = upstream_cls.from_pretrained(CHECKPOINTS / family, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ours = load_model(convert_hf(CHECKPOINTS / family, tmp_path / "converted"))
    ids, _ = load_tokenizer(tmp_path / "converted")(["a photo of a person cycling.", "a photo of a person eating."])
    pixels = torch.randn(2, 3, ours.cfg.vision.image_size, ours.cfg.vision.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours(pixels, ids)
        expected = upstream(input_ids=ids, pixel_values=pixels).logits_per_image
    worst = (got - expected).abs().max().item()
    measured(f"[demo checkpoints] {family}: max |har_ref - transformers| logits {worst:.2e}")
    assert worst < 1e-4
