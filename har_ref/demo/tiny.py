"""The demo's tiny dual encoders: each family's real architecture switches at ~0.33 M parameters.

`tiny_config` is shared by the pretraining (pretrain.py) and by the tests' random-weight checkpoints
(tests/tiny_checkpoint.py). CHECKPOINTS: where the pretrained ones ship.
"""
from __future__ import annotations

from pathlib import Path

from ..model.config import ModelConfig, TextConfig, VisionConfig

IMAGE_SIZE = 64  # synthetic images are drawn at this size; both tiny ViTs take it as is
CHECKPOINTS = Path(__file__).with_name("checkpoints")  # the pretrained tiny CLIP and SigLIP (`make pretrain`)


def tiny_config(family: str, tok: dict) -> ModelConfig:
    """A ~0.33 M parameter dual encoder with each family's real architecture switches."""
    clip = family == "clip"
    width = 64
    return ModelConfig(
        family=family, embed_dim=64 if clip else width,
        vision=VisionConfig(image_size=IMAGE_SIZE, patch_size=8, width=width, layers=3, heads=4, mlp_dim=4 * width,
                            act="quick_gelu" if clip else "gelu_tanh", ln_eps=1e-5 if clip else 1e-6,
                            pool="cls" if clip else "map", patch_bias=not clip),
        text=TextConfig(vocab_size=tok["vocab_size"], context_length=tok["context_length"], width=width, layers=2, heads=4,
                        mlp_dim=4 * width, act="quick_gelu" if clip else "gelu_tanh",
                        ln_eps=1e-5 if clip else 1e-6, causal=clip, pool="eos" if clip else "last",
                        eos_token_id=tok["eos_token_id"], eos_by_argmax=clip, pad_token_id=tok["pad_token_id"],
                        proj_bias=not clip),
        logit_scale=2.6592 if clip else 2.302585092994046,
        logit_bias=None if clip else -10.0,  # SigLIP sec. 3.2: t = log 10, b = -10
        image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
        resize="shortest_edge" if clip else "square")
