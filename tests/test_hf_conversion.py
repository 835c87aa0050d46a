"""weights_conversion hf: every source tensor used once, every target filled, with one clear message."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from weights_conversion.common import ConversionError
from weights_conversion.hf import convert_config, convert_hf

transformers = pytest.importorskip("transformers")
from transformers import CLIPConfig, CLIPModel  # noqa: E402


@pytest.fixture()
def tiny_clip_dir(tmp_path):
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=64, max_position_embeddings=8),
                     vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=16, patch_size=8), projection_dim=16)
    CLIPModel(cfg).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def tamper(src, edit):
    sd = load_file(str(src / "model.safetensors"))
    edit(sd)
    save_file(sd, str(src / "model.safetensors"))


def test_clean_conversion_writes_checkpoint(tiny_clip_dir, tmp_path):
    out = convert_hf(tiny_clip_dir, tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["family"] == "clip" and cfg["text"]["context_length"] == 8 and cfg["embed_dim"] == 16
    assert set(load_file(str(out / "model.safetensors"))) >= {"logit_scale", "vision.class_token"}


def test_missing_tensor_is_named(tiny_clip_dir, tmp_path):
    tamper(tiny_clip_dir, lambda sd: sd.pop("vision_model.post_layernorm.bias"))
    with pytest.raises(ConversionError, match=r"missing in source: vision_model\.post_layernorm\.bias"):
        convert_hf(tiny_clip_dir, tmp_path / "out")


def test_extra_tensor_is_named(tiny_clip_dir, tmp_path):
    tamper(tiny_clip_dir, lambda sd: sd.__setitem__("text_model.surprise.weight", torch.zeros(3)))
    with pytest.raises(ConversionError, match=r"unused source tensors: text_model\.surprise\.weight"):
        convert_hf(tiny_clip_dir, tmp_path / "out")


def test_misshaped_tensor_is_named(tiny_clip_dir, tmp_path):
    tamper(tiny_clip_dir, lambda sd: sd.__setitem__("text_projection.weight", torch.zeros(16, 31)))
    with pytest.raises(ConversionError, match=r"wrong shapes: text\.proj\.weight: \(16, 31\)"):
        convert_hf(tiny_clip_dir, tmp_path / "out")


def test_unknown_model_type_and_activation():
    with pytest.raises(ConversionError, match="neither 'clip' nor 'siglip'"):
        convert_config({"model_type": "blip"}, None)
    with pytest.raises(ConversionError, match="hidden_act 'relu'"):
        convert_config({"model_type": "clip", "text_config": {"hidden_act": "relu"}}, None)


def test_cli_help_and_error_exit(tmp_path):
    for sub in ("hf", "open_clip"):
        done = subprocess.run([sys.executable, "-m", "weights_conversion", sub, "--help"],
                              capture_output=True, text=True)
        assert done.returncode == 0 and "--src" in done.stdout
    done = subprocess.run([sys.executable, "-m", "weights_conversion", "hf", "--src", str(tmp_path),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert done.returncode == 2
    assert "config.json not found" in done.stderr and "Traceback" not in done.stderr
