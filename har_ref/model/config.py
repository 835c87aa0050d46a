"""Model configuration: one dataclass per tower, one for the dual encoder.

Every size, activation and epsilon lives here and is read from a checkpoint's
`config.json`; nothing in vision.py / text.py is hard-coded to ViT-B.
The two families differ only in the switches documented on each field.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# The two families (ModelConfig.family) and the names reports, charts and predictions print for them.
MODEL_NAMES = {"clip": "CLIP", "siglip": "SigLIP"}
# The two losses (ModelConfig.loss), by the family that introduced them, and what reports call them.
LOSS_NAMES = {"clip": "InfoNCE", "siglip": "sigmoid"}
# The probabilities each loss trains, which predict prints: InfoNCE a softmax over the candidates, the
# sigmoid loss an independent sigmoid per image-text pair (SigLIP eq. 1).
PROBABILITY_KIND = {"clip": "softmax", "siglip": "sigmoid"}
SIGLIP_LOGIT_BIAS_INIT = -10.0  # b's start (SigLIP paper, sec. 3.2)
# ModelConfig.resize, and the PIL filter numbers ModelConfig.resample may hold (Image.Resampling's values).
RESIZE_MODES = ("shortest_edge", "square", "none")
PIL_FILTERS = (0, 1, 2, 3, 4, 5)
# config.json fields of earlier versions, read under their current names.
RENAMED_FIELDS = {"logit_scale_init": "logit_scale", "logit_bias_init": "logit_bias"}


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "quick_gelu"  # "quick_gelu" (CLIP) | "gelu_tanh" (HF SigLIP) | "gelu" (open_clip SigLIP)
    ln_eps: float = 1e-5
    pool: str = "cls"  # "cls": CLIP class token + ln_pre | "map": SigLIP attention-pooling head
    patch_bias: bool = False  # SigLIP's patch conv has a bias, CLIP's does not


@dataclass
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    act: str = "quick_gelu"
    ln_eps: float = 1e-5
    causal: bool = True  # CLIP: causal self-attention; SigLIP: bidirectional
    pool: str = "eos"  # "eos": CLIP end-of-text token | "last": SigLIP last position
    eos_token_id: int = 49407
    # transformers keeps OpenAI's original rule when the config says eos_token_id == 2:
    # the pooled position is argmax(input_ids), which works because <|endoftext|>
    # has the largest id in the BPE vocabulary.
    eos_by_argmax: bool = True
    pad_token_id: int = 49407
    proj_bias: bool = False  # SigLIP's text head is a Linear with bias
    # Where conversion took each special-token id from (tokenizer files or config.json): a record, not read.
    token_ids_from: dict = field(default_factory=dict)


@dataclass
class ModelConfig:
    family: str = "clip"  # "clip" | "siglip"
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # The t and b the checkpoint's weights hold (save_model writes them from the tensors); a model
    # built from this config without weights starts with them. Defaults: the papers' inits.
    logit_scale: float = math.log(1 / 0.07)  # t, the log temperature: CLIP paper init; SigLIP's is log(10)
    # b: SigLIP's (init -10, SigLIP paper, sec. 3.2), or the one CLIP towers learn under the sigmoid loss;
    # None: no b (CLIP). The logits include b whenever the model has one (dual_encoder.py::DualEncoder.score).
    logit_bias: float | None = None
    # The loss the weights were last trained with, "clip" (InfoNCE) | "siglip" (sigmoid); None (a converted
    # checkpoint) is the family's own. Probabilities follow it: softmax for InfoNCE, sigmoid for the sigmoid loss.
    loss: str | None = None
    # Image preprocessing, as the checkpoint's image processor does it (model/transforms.py::build_transform):
    # resize, centre crop to vision.image_size, x / 255, (x - mean) / std.
    image_mean: tuple[float, float, float] = OPENAI_MEAN
    image_std: tuple[float, float, float] = OPENAI_STD
    # "shortest_edge": the shorter side to resize_size, aspect kept (CLIP) | "square": to resize_size x
    # resize_size (SigLIP) | "none": no resize
    resize: str = "shortest_edge"
    resize_size: int | None = None  # None (configs written before the field): vision.image_size
    # None (configs written before the field): a crop after "shortest_edge" only
    center_crop: bool | None = None
    resample: int = 3  # the resize's PIL filter (Image.Resampling): 3 = bicubic, as both upstream processors

    def __post_init__(self):
        if self.family not in MODEL_NAMES:
            raise ValueError(f"config.json: family must be 'clip' or 'siglip', got {self.family!r}")
        if self.loss is None:
            self.loss = self.family
        if self.loss not in LOSS_NAMES:
            raise ValueError(f"config.json: loss must be 'clip' or 'siglip', got {self.loss!r}")
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)
        self._check_preprocessing()

    def _check_preprocessing(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"config.json: resize must be one of {RESIZE_MODES}, got {self.resize!r}.")
        if self.resample not in PIL_FILTERS:
            raise ValueError(f"config.json: resample must be a PIL filter number {PIL_FILTERS}, got {self.resample!r}.")
        if self.center_crop is None:
            self.center_crop = self.resize == "shortest_edge"
        # Without a crop the resize alone must give the S x S images the vision tower takes.
        if not self.center_crop and (self.resize != "square" or self.resized_to != self.vision.image_size):
            raise ValueError(f"config.json: without center_crop, resize must be 'square' to vision.image_size "
                             f"({self.vision.image_size}), got {self.resize!r} to {self.resized_to}.")

    @property
    def resized_to(self) -> int:
        """The size the resize targets: resize_size, or vision.image_size where it is unset."""
        return self.resize_size or self.vision.image_size

    def to_dict(self) -> dict:
        return asdict(self)

    def architecture(self) -> dict:
        """Every field but t, b and the loss, which record how the weights were trained: what a fine-tuned
        checkpoint shares with the one it was fine-tuned from."""
        return {k: v for k, v in self.to_dict().items() if k not in ("logit_scale", "logit_bias", "loss")}

    @property
    def name(self) -> str:
        """What reports call the model: "CLIP", "SigLIP", or towers and loss when the loss is the other
        family's ("CLIP towers + sigmoid loss")."""
        if self.loss == self.family:
            return MODEL_NAMES[self.family]
        return f"{MODEL_NAMES[self.family]} towers + {LOSS_NAMES[self.loss]} loss"

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "ModelConfig":
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: a har_ref checkpoint directory needs config.json; "
                "convert an upstream checkpoint with `python -m weights_conversion hf --src HF_DIR --out DIR`."
            )
        try:
            spec = json.loads(path.read_text())
            if isinstance(spec, dict):
                spec = {RENAMED_FIELDS.get(k, k): v for k, v in spec.items()}
            return cls(**spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-convert the checkpoint.") from e
        except TypeError as e:  # unknown or missing fields, or not an object
            raise ValueError(f"{path} is not a har_ref model config ({e}); re-convert the checkpoint with "
                             "`python -m weights_conversion`.") from e


def clip_vit_b32() -> ModelConfig:
    """openai/clip-vit-base-patch32 (151 M parameters)."""
    return ModelConfig()


def siglip_base_patch16_224() -> ModelConfig:
    """google/siglip-base-patch16-224 (203 M parameters)."""
    return ModelConfig(
        family="siglip",
        embed_dim=768,
        vision=VisionConfig(patch_size=16, act="gelu_tanh", ln_eps=1e-6, pool="map", patch_bias=True),
        text=TextConfig(vocab_size=32000, context_length=64, width=768, heads=12, mlp_dim=3072,
                        act="gelu_tanh", ln_eps=1e-6, causal=False, pool="last", eos_token_id=1,
                        eos_by_argmax=False, pad_token_id=1, proj_bias=True),
        logit_scale=math.log(10.0),
        logit_bias=SIGLIP_LOGIT_BIAS_INIT,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        resize="square",
    )
