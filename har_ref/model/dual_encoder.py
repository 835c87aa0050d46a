"""DualEncoder: an image tower and a text tower scored by scaled cosine similarity.

    CLIP   (Radford et al. 2021):  logits = exp(t) * cos(x_i, y_j)
    SigLIP (Zhai et al. 2023):     logits = exp(t) * cos(x_i, y_j) + b

CLIP towers trained with the sigmoid loss (`train --loss siglip`) learn a b too: config.json then holds
one (ModelConfig.logit_bias) and the model scores with it like SigLIP.

`load_model(dir)` reads a converted checkpoint (config.json + model.safetensors);
nothing is ever unpickled.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .text import TextTransformer
from .vision import VisionTransformer


class DualEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vision, cfg.embed_dim)
        self.text = TextTransformer(cfg.text, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale)))
        if cfg.family == "siglip" or cfg.logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(cfg.logit_bias or 0.0)))
        else:
            self.logit_bias = None

    def add_logit_bias(self, value: float) -> None:
        """Give a model without b one, started at `value` (CLIP towers trained with the sigmoid loss)."""
        self.logit_bias = nn.Parameter(torch.tensor(float(value), device=self.logit_scale.device))
        self.cfg = replace(self.cfg, logit_bias=float(value))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, D] projected, not normalized."""
        return self.vision(pixel_values)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] token ids -> [B, D] projected, not normalized."""
        return self.text(input_ids, attention_mask)

    def score(self, image_unit: torch.Tensor, text_unit: torch.Tensor) -> torch.Tensor:
        """The one score of an image-text pair, [N_images, N_texts] from unit vectors:
        CLIP exp(t) * cos (Radford et al. 2021, Fig. 3); SigLIP exp(t) * cos + b (Zhai et al. 2023, Alg. 1).
        The losses compute the same logits block by block (train/losses.py)."""
        logits = self.logit_scale.exp() * (image_unit @ text_unit.T)
        return logits + self.logit_bias if self.logit_bias is not None else logits

    def logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """logits_per_image [N_images, N_texts] from projected (unnormalized) embeddings."""
        return self.score(F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask))

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.vision.transformer.grad_checkpointing = enabled
        self.text.transformer.grad_checkpointing = enabled


def save_model(model: DualEncoder, directory: str | Path) -> None:
    """Write config.json and model.safetensors; the weights file is replaced atomically.
    config.json states the t and b the weights hold (not the values the model was built with)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bias = None if model.logit_bias is None else model.logit_bias.item()
    replace(model.cfg, logit_scale=model.logit_scale.item(), logit_bias=bias).save(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = directory / "model.safetensors.tmp"
    # One metadata key: safetensors writes the metadata map in hash order, which differs between
    # processes, and a resumed run must write the same bytes as an uninterrupted one.
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / "model.safetensors")


def load_state(model: DualEncoder, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with one readable message listing every missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = sorted(f"{k} {tuple(tensors[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                    if k in tensors and tensors[k].shape != v.shape)
    family = {"vision.class_token": "CLIP", "vision.head.probe": "SigLIP"}  # the pooling each family has
    found, described = ([name for key, name in family.items() if key in keys] for keys in (tensors, expected))
    if found != described:
        raise ValueError(f"{source} holds {'/'.join(found) or 'unknown'} weights but config.json next to it "
                         f"describes {'/'.join(described)}; use the config.json written with these weights "
                         "(re-convert the checkpoint).")
    if ("logit_bias" in tensors) != ("logit_bias" in expected):  # SigLIP's b, or one CLIP towers learned
        found, described = ("a logit bias b", "none") if "logit_bias" in tensors else ("no logit bias b", "one")
        raise ValueError(f"{source} holds {found} but config.json next to it describes {described}; "
                         "use the config.json written with these weights.")
    if missing or unexpected or shapes:
        raise ValueError(f"{source} does not match config.json: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}, wrong shape {shapes[:8]}; "
                         "re-convert the checkpoint with `python -m weights_conversion`.")
    model.load_state_dict(tensors)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file; a damaged or foreign file is one clear ValueError."""
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types (header, truncation, I/O)
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); "
                         "re-convert or re-copy the checkpoint.") from e


def load_model(directory: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> DualEncoder:
    """Build the model described by DIR/config.json and load DIR/model.safetensors, in eval mode."""
    directory = Path(directory)
    cfg = ModelConfig.load(directory)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: convert a checkpoint with "
                                "`python -m weights_conversion hf --src HF_DIR --out DIR`.")
    with torch.device("meta"):
        model = DualEncoder(cfg)  # no point initializing weights that are about to be overwritten
    model = model.to_empty(device="cpu")
    load_state(model, read_safetensors(weights), str(weights))
    return model.to(device=device, dtype=dtype).eval()
