"""Training settings: one dataclass, two presets that reproduce the study's protocol (sec. 3).

Study protocol: CLIP ViT-B/32 with effective batch ~4,000 and XBM ~4,000; SigLIP base/16-224
with effective batch ~32,000 and XBM ~32,000; AdamW; bf16/fp16 autocast; drop_last;
one template sampled per example per epoch; 10 epochs. Every number is overridable by flag.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass
class TrainConfig:
    model: str = "clip"  # "clip" | "siglip": the protocol preset, and the towers the --weights checkpoint must have
    loss: str | None = None  # "clip" (InfoNCE) | "siglip" (sigmoid, with a learnable b); None: the --model preset's
    epochs: int = 10
    micro_batch: int = 128  # images per forward/backward
    accum_steps: int = 32  # micro-batches per optimizer step; effective batch = micro_batch * accum_steps
    accum_mode: str = "independent"  # "independent" | "cached" (GradCache: exact large-batch gradients)
    xbm_size: int = 4096  # cross-batch memory entries (0 disables it)
    xbm_warmup_steps: int = 100  # enqueues before the memory is used (micro-batches; steps in cached mode)
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup_steps: int = 2  # optimizer steps of linear warm-up, then cosine decay to 0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    precision: str = "auto"  # "auto" | "fp32" | "bf16" | "fp16"
    pos_weight: str = "none"  # sigmoid loss only: "none" | "balanced" | a number
    # Sigmoid loss only: where b starts, "checkpoint" (keep the b the checkpoint holds, ModelConfig.logit_bias;
    # CLIP towers hold none and start at SigLIP's -10) | "auto" (logit of the positive share) | a number
    logit_bias_init: str = "checkpoint"
    # "upstream": t clamped to [0, ln 100] under InfoNCE (CLIP sec. 2.5, open_clip), free under the sigmoid
    # loss (big_vision) | "none": never clamped
    clamp_logit_scale: str = "upstream"
    lock: str = ""  # "image" | "text": that tower is frozen (LiT, Zhai et al. 2022, is "image"); "": train both
    balanced_batches: bool = False  # every micro-batch holds each class within one of micro_batch / K
    augment: bool = False  # random resized crop + horizontal flip on train images
    workers: int = 2
    seed: int = 0
    prompts: str | None = None  # template bank JSON; None = the packaged data/prompts.json
    compile: bool = False  # torch.compile the encoders
    grad_checkpointing: bool = False
    cache_dir: str | None = None  # preprocessed uint8 image cache (data/image_cache.py); None disables it
    eval_batch: int = 64
    checkpoint_every: int = 0  # also checkpoint every N micro-batches (0: only by time and at epoch ends)
    checkpoint_minutes: float = 30.0  # also checkpoint when this long has passed since the last one (0: never)
    max_nonfinite: int = 10  # stop after this many consecutive non-finite losses
    val_fraction: float = 0.0  # share of each class's train images held out (not trained on) as a validation part
    shuffle_labels: bool = False  # negative control: each train image gets a random class (seeded by --seed)
    shift_split: str = "test_shift"  # also evaluate DATA/<shift_split>/ when it exists ("" never)
    synthetic: bool = False  # set by the offline demo so reports say what the numbers are

    def __post_init__(self):
        if self.loss is None:  # the preset's loss: CLIP's InfoNCE for clip, the sigmoid loss for siglip
            self.loss = self.model

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.accum_steps

    def validate(self) -> None:
        checks = [
            (self.model in ("clip", "siglip"), f"--model must be clip or siglip, got {self.model!r}"),
            (self.loss in ("clip", "siglip"), f"--loss must be clip (InfoNCE) or siglip (sigmoid), got {self.loss!r}"),
            (self.lock in ("", "image", "text"), f"--lock must be image or text, got {self.lock!r}"),
            (self.clamp_logit_scale in ("upstream", "none"),
             f"--clamp-logit-scale must be upstream or none, got {self.clamp_logit_scale!r}"),
            (self.accum_mode in ("independent", "cached"), f"--accum-mode must be independent or cached, got {self.accum_mode!r}"),
            (self.precision in ("auto", "fp32", "bf16", "fp16"), f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}"),
            (self.micro_batch > 0, f"--micro-batch (the batch size) must be a positive number of images, got {self.micro_batch}"),
            (self.accum_steps > 0 and self.epochs >= 0,
             "--accum-steps must be positive and --epochs >= 0 (0 evaluates the starting weights as a run)"),
            (0.0 <= self.val_fraction < 1.0, f"--val-fraction must be in [0, 1), got {self.val_fraction}"),
            (self.xbm_size >= 0, "--xbm-size must be >= 0 (0 disables the memory)"),
            (self.eval_batch > 0 and self.workers >= 0, "--eval-batch must be positive and --workers >= 0"),
            (self.checkpoint_every >= 0 and self.checkpoint_minutes >= 0,
             "--checkpoint-every and --checkpoint-minutes must be >= 0 (0 disables that trigger)"),
            (self.max_nonfinite >= 1, "--max-nonfinite must be at least 1"),
            (self.lr > 0 and self.weight_decay >= 0 and self.grad_clip >= 0 and self.warmup_steps >= 0,
             "--lr must be positive and --weight-decay, --grad-clip, --warmup-steps >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message + ".")
        if self.logit_bias_init not in ("checkpoint", "auto"):
            try:
                float(self.logit_bias_init)
            except ValueError:
                raise ValueError(f"--logit-bias-init must be checkpoint, auto or a number, got "
                                 f"{self.logit_bias_init!r}.") from None
        if self.pos_weight not in ("none", "balanced"):
            try:
                float(self.pos_weight)
            except ValueError:
                raise ValueError(f"--pos-weight must be none, balanced or a number, got {self.pos_weight!r}.") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(Path(path).read_text()).items() if k in known})


def preset(model: str) -> TrainConfig:
    """The study's protocol for each model (report sec. 3)."""
    if model == "clip":  # effective batch 128 x 32 = 4,096 (~4k), XBM 4,096
        return TrainConfig(model="clip", micro_batch=128, accum_steps=32, xbm_size=4096, lr=1e-5)
    if model == "siglip":  # effective batch 64 x 500 = 32,000 (~32k), XBM 32,000
        return TrainConfig(model="siglip", micro_batch=64, accum_steps=500, xbm_size=32_000, lr=1e-5)
    raise ValueError(f"--model must be clip or siglip, got {model!r}.")
