"""har_ref checkpoint directory -> transformers CLIPModel / SiglipModel directory (hf.py, inverted).

Input: a directory holding har_ref's config.json and model.safetensors, and usually its tokenizer
files: what `python -m weights_conversion hf|open_clip` writes, or a finished training run.
Output: what `CLIPModel/SiglipModel.save_pretrained` and their processors' `save_pretrained`
would write, so that `from_pretrained` loads it with no missing or unused weights:

    config.json               CLIPConfig / SiglipConfig built from har_ref's ModelConfig
    model.safetensors         transformers' key names, from hf.key_table (the one table both
                              directions share; fused q | k | v split back into three)
    preprocessor_config.json  har_ref's eval transform (the resize, crop, filter, mean and std conversion
                              read from the source checkpoint's image processor) as CLIPImageProcessor /
                              SiglipImageProcessor settings (hub layout, read by transformers 4 and 5)
    tokenizer files           copied, plus a tokenizer_config.json that pads like har_ref does

Two things are not plain renames:
- The activation. har_ref names the function it computes (quick_gelu, gelu_tanh, exact gelu, the
  last for open_clip conversions); transformers' hidden_act for the same function is
  hf.HF_ACTIVATIONS read backwards.
- The pooled text token. har_ref's CLIP pools at argmax(input_ids) when eos_by_argmax is set;
  transformers does exactly that only when text_config.eos_token_id == 2 (its legacy rule,
  kept for OpenAI's configs), so that is what config.json says. Otherwise it pools the first
  eos_token_id, as har_ref does. SigLIP pools the last position in both.

transformers 5 resizes with torchvision by default, which differs from PIL (and from har_ref) by a
few uint8 levels on some pixels; `from_pretrained(..., backend="pil")` reproduces har_ref exactly.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from har_ref.model.config import ModelConfig
from har_ref.model.dual_encoder import load_model
from har_ref.model.tokenizer import (CLIP_BOS, CLIP_EOS, SIGLIP_EOS, SIGLIP_UNK, TOKENIZER_FILES, ClipTokenizer,
                                     load_tokenizer)

from .common import ConversionError
from .hf import HF_ACTIVATIONS, SCALARS, key_table, upstream_scalar_shape

# har_ref activation -> transformers hidden_act computing the same function.
ACTIVATIONS = {ours: theirs for theirs, ours in HF_ACTIVATIONS.items()}
# The tokenizer files copied as they are: all but tokenizer_config.json, which is merged (write_tokenizer).
COPIED_TOKENIZER_FILES = tuple(name for name in TOKENIZER_FILES if name != "tokenizer_config.json")
LEGACY_ARGMAX_EOS = 2  # transformers' CLIPTextTransformer pools at argmax(input_ids) for this eos_token_id


def read_checkpoint(src: Path) -> ModelConfig:
    """Check that `src` is a har_ref checkpoint; every failure is one sentence saying what to pass."""
    if not src.is_dir():
        raise ConversionError(f"--src {src} is not a directory; pass a har_ref checkpoint or training run directory.")
    if not (src / "config.json").is_file():
        raise ConversionError(f"{src}/config.json not found; --src must be a har_ref checkpoint directory "
                              "(written by `python -m weights_conversion hf|open_clip` or `python -m har_ref train`).")
    if not (src / "model.safetensors").is_file():
        unfinished = (src / "checkpoint" / "model.safetensors").is_file()
        hint = f"; the run has not finished: pass --src {src}/checkpoint for its last epoch" if unfinished else ""
        raise ConversionError(f"{src}/model.safetensors not found{hint}.")
    try:
        raw = json.loads((src / "config.json").read_text())
    except ValueError as e:
        raise ConversionError(f"{src}/config.json is not valid JSON ({e}).") from e
    if isinstance(raw, dict) and "model_type" in raw:
        raise ConversionError(f"{src} is a transformers checkpoint already (config.json has model_type "
                              f"{raw['model_type']!r}); export-hf reads har_ref checkpoints.")
    try:
        return ModelConfig.load(src)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{src}/config.json is not a har_ref model config ({e}).") from e


def check_expressible(cfg: ModelConfig) -> None:
    """Switches of har_ref's config that transformers' classes hard-code rather than read from config.json."""
    clip = cfg.family == "clip"
    text = (cfg.text.causal, cfg.text.pool)
    if clip and text != (True, "eos"):
        raise ConversionError(f"config.json: text causal={text[0]}, pool={text[1]!r}; transformers' CLIPModel "
                              "has a causal text tower pooled at the end token (causal=true, pool 'eos').")
    if not clip and text != (False, "last"):
        raise ConversionError(f"config.json: text causal={text[0]}, pool={text[1]!r}; transformers' SiglipModel "
                              "has a bidirectional text tower pooled at the last position (causal=false, pool 'last').")


def hf_activation(act: str) -> str:
    if act not in ACTIVATIONS:
        raise ConversionError(f"config.json: activation {act!r} has no transformers equivalent; "
                              f"known: {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[act]


def export_config(cfg: ModelConfig, bos_token_id: int | None) -> dict:
    """CLIPConfig / SiglipConfig fields (as save_pretrained writes them) from har_ref's ModelConfig."""
    t, v = cfg.text, cfg.vision
    text = dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim,
                num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.context_length,
                hidden_act=hf_activation(t.act), layer_norm_eps=t.ln_eps, pad_token_id=t.pad_token_id,
                bos_token_id=bos_token_id, eos_token_id=LEGACY_ARGMAX_EOS if t.eos_by_argmax else t.eos_token_id)
    vision = dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.layers,
                  num_attention_heads=v.heads, num_channels=3, image_size=v.image_size, patch_size=v.patch_size,
                  hidden_act=hf_activation(v.act), layer_norm_eps=v.ln_eps)
    if cfg.family == "clip":
        text.update(model_type="clip_text_model", projection_dim=cfg.embed_dim)
        vision.update(model_type="clip_vision_model", projection_dim=cfg.embed_dim)
        return dict(architectures=["CLIPModel"], model_type="clip", projection_dim=cfg.embed_dim,
                    logit_scale_init_value=cfg.logit_scale, dtype="float32",
                    text_config=text, vision_config=vision)
    # SigLIP's image embedding is the MAP head's output, so its width is the embedding size.
    text.update(model_type="siglip_text_model", projection_size=cfg.embed_dim)
    vision.update(model_type="siglip_vision_model", vision_use_head=True)
    return dict(architectures=["SiglipModel"], model_type="siglip", dtype="float32",
                text_config=text, vision_config=vision)


def export_state_dict(ours: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """har_ref key names -> transformers key names, through hf.key_table read backwards."""
    table = key_table(cfg)
    mapped = {key for key, _ in table}
    if mapped != set(ours):
        raise ConversionError(f"har_ref tensors without a transformers name: {sorted(set(ours) - mapped)[:8]}, "
                              f"named but absent: {sorted(mapped - set(ours))[:8]}.")
    theirs = {}
    for key, hf_keys in table:
        tensor = ours[key].reshape(upstream_scalar_shape(cfg.family)) if key in SCALARS else ours[key]
        parts = tensor.chunk(len(hf_keys)) if len(hf_keys) > 1 else (tensor,)  # q | k | v: equal row blocks
        for hf_key, part in zip(hf_keys, parts):
            theirs[hf_key] = part.contiguous()
    return theirs


def preprocessor_config(cfg: ModelConfig) -> dict:
    """har_ref's eval transform (har_ref/model/transforms.py::build_transform) in the image processor's
    terms: the resize (PIL filter cfg.resample), the centre crop, then x / 255, mean, std; what
    weights_conversion/hf.py::image_settings reads back into the same fields.

    SigLIP's crop (a SiglipImageProcessor saved with do_center_crop) is written as the source had it:
    transformers 5's SiglipImageProcessor applies it, 4's ignores it, for the source as for the export.
    """
    size, n = cfg.vision.image_size, cfg.resized_to
    clip = cfg.family == "clip"
    settings = dict(
        image_processor_type="CLIPImageProcessor" if clip else "SiglipImageProcessor",
        processor_class="CLIPProcessor" if clip else "SiglipProcessor",
        do_convert_rgb=True, do_resize=cfg.resize != "none", resample=cfg.resample, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=list(cfg.image_mean), image_std=list(cfg.image_std))
    if cfg.resize == "shortest_edge":
        settings.update(size={"shortest_edge": n})
    elif cfg.resize == "square":
        settings.update(size={"height": n, "width": n})
    if cfg.center_crop:
        settings.update(do_center_crop=True, crop_size={"height": size, "width": size})
    elif clip:  # CLIPImageProcessor crops unless told not to
        settings.update(do_center_crop=False)
    return settings


def write_tokenizer(src: Path, out: Path, cfg: ModelConfig, tokenizer) -> None:
    """Copy the tokenizer files and write a tokenizer_config.json with which transformers' tokenizer
    gives har_ref's ids, padded to the context length with padding='max_length'.

    The pad token is declared only when it is a special token. open_clip pads CLIP text with id 0,
    which is "!": declared as pad_token it would become special and "!" in a prompt would be
    encoded as it. transformers then pads with <|endoftext|>; CLIP's causal text tower pools
    at the end token, before any padding, so the embeddings are the same.
    """
    for name in COPIED_TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    pad_id = cfg.text.pad_token_id
    if isinstance(tokenizer, ClipTokenizer):
        pad = tokenizer.backend.id_to_token(pad_id)
        defaults = dict(tokenizer_class="CLIPTokenizer", bos_token=CLIP_BOS, eos_token=CLIP_EOS, unk_token=CLIP_EOS)
        special = pad in (CLIP_BOS, CLIP_EOS)
    else:
        pad = tokenizer.sp.id_to_piece(pad_id)
        defaults = dict(tokenizer_class="SiglipTokenizer", eos_token=SIGLIP_EOS, unk_token=SIGLIP_UNK,
                        do_lower_case=True)
        special = tokenizer.sp.is_control(pad_id) or tokenizer.sp.is_unknown(pad_id)
    if special:
        defaults["pad_token"] = pad
    path = src / "tokenizer_config.json"
    declared = json.loads(path.read_text()) if path.is_file() else {}
    # A declared pad token already equals pad_id (load_tokenizer checked it); model_max_length must be
    # the context: tokenizers saved from bare vocabulary files carry transformers' 1e30 placeholder.
    config = {**defaults, **declared, "model_max_length": cfg.text.context_length}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def export_hf(src: str | Path, out: str | Path, drop_logit_bias: bool = False) -> Path:
    """Write the transformers directory for the har_ref checkpoint in `src` to `out`.

    CLIP towers trained with the sigmoid loss (`train --loss siglip`) hold a logit bias b that CLIPModel
    cannot: refused unless `drop_logit_bias` (--drop-logit-bias), which exports them without b (the
    same predictions and softmax, not the sigmoid probabilities the run trained)."""
    src, out = Path(src), Path(out)
    cfg = read_checkpoint(src)
    if out.resolve() == src.resolve():
        raise ConversionError("--out must differ from --src: both directories hold a config.json.")
    check_expressible(cfg)
    try:
        tensors = load_model(src).state_dict()  # float32, every key and shape checked against config.json
    except ValueError as e:
        raise ConversionError(str(e)) from e
    if cfg.family == "clip" and "logit_bias" in tensors:
        if not drop_logit_bias:
            raise ConversionError(f"{src} is CLIP towers trained with the sigmoid loss and holds a logit bias b "
                                  f"({cfg.logit_bias:.6g}) that transformers' CLIPModel has no place for; pass "
                                  "--drop-logit-bias to export it without b (same predictions, not the sigmoid "
                                  "probabilities).")
        del tensors["logit_bias"]
        print(f"note: the logit bias b = {cfg.logit_bias:.6g} of {src} is not exported (--drop-logit-bias).")
    if cfg.family == "siglip" and cfg.loss == "clip":
        print(f"note: {src} was trained with InfoNCE, which transformers' config.json cannot record: its "
              "probabilities are the softmax over the classes' logits, not SiglipModel's per-pair sigmoid.")
    try:
        tokenizer = load_tokenizer(src)
    except FileNotFoundError:
        tokenizer = None
    except ValueError as e:
        raise ConversionError(str(e)) from e
    bos = tokenizer.bos_token_id if isinstance(tokenizer, ClipTokenizer) else None
    hf_config = export_config(cfg, bos)
    hf_tensors = export_state_dict(tensors, cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file(hf_tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(cfg), indent=2) + "\n")
    if tokenizer is not None:
        write_tokenizer(src, out, cfg, tokenizer)
    else:
        files = "tokenizer.json or vocab.json + merges.txt" if cfg.family == "clip" else "spiece.model"
        print(f"note: no tokenizer written: {src} has none ({files}), so only the model and image "
              f"processor load from {out}; copy the model's tokenizer files into {src} and export again.")
    return out
