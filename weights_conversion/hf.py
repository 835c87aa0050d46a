"""transformers CLIPModel / SiglipModel checkpoint directory -> har_ref checkpoint directory.

Input: what `save_pretrained` writes or the hub serves (config.json, model.safetensors or
pytorch_model.bin, tokenizer and image processor files). Output: har_ref's config.json (with the image
processor's resize, crop, mean and std), model.safetensors in har_ref key names (float32), and the
tokenizer and image processor files copied over.
`key_table` is the one key mapping; export_hf.py reads it backwards for the other direction.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from har_ref.model.config import OPENAI_MEAN, OPENAI_STD, PIL_FILTERS, ModelConfig, TextConfig, VisionConfig
from har_ref.model.tokenizer import TOKENIZER_FILES

from .common import ConversionError, KeyMapper, read_state_dict, write_checkpoint

# The image processor's settings: preprocessor_config.json (the hub's; what an image processor's own
# save_pretrained writes, and transformers 4's CLIPProcessor / SiglipProcessor), or "image_processor" in
# processor_config.json (transformers 5's CLIPProcessor / SiglipProcessor.save_pretrained). Copied as they
# are, as a record: config.json holds what har_ref reads.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
COPIED_FILES = TOKENIZER_FILES + PROCESSOR_FILES
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# transformers' defaults, used when an older config.json leaves a field out.
CLIP_DEFAULTS = dict(
    text=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
              num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
              layer_norm_eps=1e-5, eos_token_id=2, pad_token_id=1),
    vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5))
SIGLIP_DEFAULTS = dict(
    text=dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
              layer_norm_eps=1e-6, eos_token_id=1, pad_token_id=1),
    vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6))


def _activation(name: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise ConversionError(f"config.json: hidden_act {name!r} is not supported; har_ref knows {sorted(HF_ACTIVATIONS)}.")
    return HF_ACTIVATIONS[name]


def read_image_processor(src: Path) -> tuple[dict | None, str]:
    """(the image processor settings transformers loads from `src`, or None; the file they are in).

    Both files may be there (a processor saved over an older directory): processor_config.json's nested
    settings win, because transformers 5 reads them first (ImageProcessingMixin.get_image_processor_dict),
    and har_ref must give the pixels transformers gives for the same directory.
    """
    def read(path: Path) -> dict:
        try:
            settings = json.loads(path.read_text())
        except ValueError as e:
            raise ConversionError(f"{path} is not valid JSON ({e}); re-save the processor or remove the file.") from e
        if not isinstance(settings, dict):
            raise ConversionError(f"{path} holds no JSON object; re-save the processor or remove the file.")
        return settings

    nested, flat = src / "processor_config.json", src / "preprocessor_config.json"
    if nested.is_file() and isinstance(read(nested).get("image_processor"), dict):
        return read(nested)["image_processor"], f"{nested.name} image_processor"
    return (read(flat), flat.name) if flat.is_file() else (None, flat.name)


def _size_dict(value, name: str, where: str, square_int: bool) -> dict:
    """transformers' get_size_dict: an int is {"shortest_edge": n} for `size` (CLIPImageProcessor and
    SiglipImageProcessor set default_to_square=False) and n x n for `crop_size`; a pair is (height, width)."""
    if isinstance(value, int):
        return {"height": value, "width": value} if square_int else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": value[0], "width": value[1]}
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if v is not None}
        if set(value) in ({"shortest_edge"}, {"height", "width"}):
            return value
    raise ConversionError(f"{where}: {name} {value!r} is not a size har_ref follows ({{'shortest_edge': n}}, "
                          "{'height': h, 'width': w}, or an int); re-save the image processor with one of them.")


def image_settings(pre: dict | None, family: str, image_size: int, where: str) -> dict:
    """ModelConfig's preprocessing fields from the checkpoint's image processor settings, as transformers'
    CLIPImageProcessor / SiglipImageProcessor apply them: a field left out (or null) takes that class's
    default. No settings at all (no file): the family's processor at the model's own image size."""
    clip = family == "clip"
    if pre is None:
        pre = dict(size={"shortest_edge": image_size} if clip else {"height": image_size, "width": image_size},
                   crop_size={"height": image_size, "width": image_size})
    pre = {k: v for k, v in pre.items() if v is not None}
    if (pre.get("do_rescale", True), pre.get("do_normalize", True)) != (True, True) or \
            abs(pre.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
        raise ConversionError(f"{where}: do_rescale, rescale_factor or do_normalize is not x / 255 then "
                              "(x - mean) / std, the only scaling har_ref has; set them so if the model was trained so.")
    # The classes' defaults: CLIP resizes the shorter side to 224 and crops 224 x 224; SigLIP resizes to
    # 224 x 224 and does not crop. Both resample bicubic (PIL filter 3).
    resize, resize_size = "none", None
    if pre.get("do_resize", True):
        size = _size_dict(pre.get("size", {"shortest_edge": 224} if clip else {"height": 224, "width": 224}),
                          "size", where, square_int=False)
        if "shortest_edge" in size:
            resize, resize_size = "shortest_edge", size["shortest_edge"]
        elif size["height"] == size["width"]:
            resize, resize_size = "square", size["height"]
        else:
            raise ConversionError(f"{where}: size {size} is not square; har_ref resizes to n x n or the shorter "
                                  "side to n.")
    crop = bool(pre.get("do_center_crop", clip))
    if crop:
        crop_size = _size_dict(pre.get("crop_size", 224), "crop_size", where, square_int=True)
        made = f"{crop_size.get('height')} x {crop_size.get('width')} images"
        fits = crop_size == {"height": image_size, "width": image_size}
    else:
        made = f"{resize_size} x {resize_size} images" if resize == "square" else "images of the input's shape"
        fits = resize == "square" and resize_size == image_size
    if not fits:
        raise ConversionError(f"{where}: the image processor makes {made} but the vision tower takes "
                              f"{image_size} x {image_size}; re-save the image processor for the model's size.")
    resample = pre.get("resample", 3)
    if resample not in PIL_FILTERS:
        raise ConversionError(f"{where}: resample {resample!r} is not a PIL filter number {PIL_FILTERS}.")
    mean = pre.get("image_mean", OPENAI_MEAN if clip else (0.5, 0.5, 0.5))
    std = pre.get("image_std", OPENAI_STD if clip else (0.5, 0.5, 0.5))
    return dict(image_mean=tuple(mean) if isinstance(mean, (list, tuple)) else (mean,) * 3,  # a float: all three
                image_std=tuple(std) if isinstance(std, (list, tuple)) else (std,) * 3,
                resize=resize, resize_size=resize_size, center_crop=crop, resample=resample)


def convert_config(hf: dict, preprocessor: dict | None, where: str = "preprocessor_config.json") -> ModelConfig:
    family = hf.get("model_type")
    if family not in ("clip", "siglip"):
        raise ConversionError(f"config.json: model_type {family!r} is neither 'clip' nor 'siglip'; "
                              "pass the directory of a CLIPModel or SiglipModel checkpoint.")
    defaults = CLIP_DEFAULTS if family == "clip" else SIGLIP_DEFAULTS
    t = {**defaults["text"], **hf.get("text_config", {})}
    v = {**defaults["vision"], **hf.get("vision_config", {})}
    if family == "siglip" and not v.get("vision_use_head", True):
        raise ConversionError("config.json: vision_use_head is false; har_ref's SigLIP needs the MAP head.")
    clip = family == "clip"
    text_width = t["hidden_size"]
    embed_dim = hf.get("projection_dim", 512) if clip else t.get("projection_size", text_width)
    text = TextConfig(
        vocab_size=t["vocab_size"], context_length=t["max_position_embeddings"], width=text_width,
        layers=t["num_hidden_layers"], heads=t["num_attention_heads"], mlp_dim=t["intermediate_size"],
        act=_activation(t["hidden_act"]), ln_eps=t["layer_norm_eps"], causal=clip,
        pool="eos" if clip else "last", eos_token_id=t["eos_token_id"],
        eos_by_argmax=clip and t["eos_token_id"] == 2,  # transformers' legacy rule, see har_ref/model/text.py
        pad_token_id=t["pad_token_id"], proj_bias=not clip)
    vision = VisionConfig(
        image_size=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"],
        layers=v["num_hidden_layers"], heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"],
        act=_activation(v["hidden_act"]), ln_eps=v["layer_norm_eps"], pool="cls" if clip else "map",
        patch_bias=not clip)
    # t and b are not taken from config.json (it holds transformers' init values): save_model writes
    # the ones the converted tensors hold.
    return ModelConfig(family=family, embed_dim=embed_dim, vision=vision, text=text,
                       **image_settings(preprocessor, family, vision.image_size, where))


def _encoder_keys(src: str, dst: str, layers: int) -> list[tuple[str, tuple[str, ...]]]:
    pairs = []
    for i in range(layers):
        s, d = f"{src}.encoder.layers.{i}", f"{dst}.transformer.blocks.{i}"
        for p in ("weight", "bias"):
            pairs += [(f"{d}.attn.qkv.{p}", tuple(f"{s}.self_attn.{n}_proj.{p}" for n in "qkv")),  # fused q | k | v
                      (f"{d}.attn.out.{p}", (f"{s}.self_attn.out_proj.{p}",)),
                      (f"{d}.ln1.{p}", (f"{s}.layer_norm1.{p}",)), (f"{d}.ln2.{p}", (f"{s}.layer_norm2.{p}",)),
                      (f"{d}.mlp.fc1.{p}", (f"{s}.mlp.fc1.{p}",)), (f"{d}.mlp.fc2.{p}", (f"{s}.mlp.fc2.{p}",))]
    return pairs


def _same_params(modules: dict[str, str],
                 params: tuple[str, ...] = ("weight", "bias")) -> list[tuple[str, tuple[str, ...]]]:
    """{har_ref module: transformers module} with the same parameter names."""
    return [(f"{ours}.{p}", (f"{theirs}.{p}",)) for ours, theirs in modules.items() for p in params]


def key_table(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...]]]:
    """Every har_ref tensor and the transformers tensor(s) it is made of, in both directions.

    Several transformers keys are concatenated along dim 0 into one har_ref tensor (q | k | v,
    all the same size), so the export (export_hf.py) splits it back into equal chunks. The logit
    scalars (SCALARS) are 0-d here; their transformers shape is `upstream_scalar_shape`.
    """
    clip = cfg.family == "clip"
    pairs = [("text.token_embed.weight", ("text_model.embeddings.token_embedding.weight",)),
             ("text.pos_embed", ("text_model.embeddings.position_embedding.weight",)),
             ("vision.patch_embed.weight", ("vision_model.embeddings.patch_embedding.weight",)),
             ("vision.pos_embed", ("vision_model.embeddings.position_embedding.weight",)),
             ("logit_scale", ("logit_scale",))]
    pairs += _encoder_keys("text_model", "text", cfg.text.layers)
    pairs += _encoder_keys("vision_model", "vision", cfg.vision.layers)
    pairs += _same_params({"text.ln_final": "text_model.final_layer_norm",
                           "vision.ln_post": "vision_model.post_layernorm"})
    if clip:
        pairs += [("text.proj.weight", ("text_projection.weight",)),
                  ("vision.proj.weight", ("visual_projection.weight",)),
                  ("vision.class_token", ("vision_model.embeddings.class_embedding",))]
        pairs += _same_params({"vision.ln_pre": "vision_model.pre_layrnorm"})  # sic: upstream's spelling
    else:
        h = "vision_model.head"
        pairs += [("vision.patch_embed.bias", ("vision_model.embeddings.patch_embedding.bias",)),
                  ("vision.head.probe", (f"{h}.probe",)), ("logit_bias", ("logit_bias",))]
        pairs += _same_params({"text.proj": "text_model.head", "vision.head.out_proj": f"{h}.attention.out_proj",
                               "vision.head.mlp.fc1": f"{h}.mlp.fc1", "vision.head.mlp.fc2": f"{h}.mlp.fc2",
                               "vision.head.ln": f"{h}.layernorm"})
        pairs += _same_params({"vision.head": f"{h}.attention"}, ("in_proj_weight", "in_proj_bias"))
    return pairs


SCALARS = ("logit_scale", "logit_bias")


def upstream_scalar_shape(family: str) -> tuple[int, ...]:
    """CLIPModel's logit_scale is 0-d; SiglipModel's logit_scale and logit_bias have shape [1]."""
    return () if family == "clip" else (1,)


def convert_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    # Older checkpoints store position_ids buffers; they are arange() and not weights.
    m = KeyMapper(sd, ignore=("embeddings.position_ids",))
    for ours, theirs in key_table(cfg):
        parts = [m.take(k) for k in theirs]
        tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
        # a missing scalar stays empty, so that finish() reports it by name
        m.put(ours, tensor.reshape(()) if ours in SCALARS and tensor.numel() == 1 else tensor)
    return m.finish(cfg)


def find_weights(src: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (src / name).is_file():
            return src / name
    if any(src.glob("model-*.safetensors")) or (src / "model.safetensors.index.json").exists():
        raise ConversionError(f"{src} holds a sharded checkpoint; re-save it with "
                              "save_pretrained(..., max_shard_size='2GB') into one file.")
    raise ConversionError(f"{src} has no model.safetensors or pytorch_model.bin; pass the directory "
                          "written by CLIPModel/SiglipModel.save_pretrained or downloaded from the hub.")


def set_token_ids(src: Path, cfg: ModelConfig, hf_text: dict) -> None:
    """Take the special-token ids from the checkpoint's tokenizer files and record where each came from
    in cfg.text.token_ids_from (written to config.json).

    The tokenizer files are the authority, not config.json: transformers' CLIP text config says
    pad_token_id=1 while its tokenizer pads with <|endoftext|> (49407), and SiglipModel.save_pretrained
    writes SiglipTextConfig's defaults bos/eos = 49406/49407 (CLIP's ids, outside SigLIP's 32,000-piece
    vocabulary), while SigLIP's SentencePiece ends with </s> (1) and has no start token. SigLIP pools the
    last position, so its end id is never read by the forward pass; CLIP pools at config.json's
    eos_token_id, exactly as transformers does, so for CLIP that field stays and is checked.
    """
    from har_ref.model.tokenizer import ClipTokenizer, SiglipTokenizer, declared_pad_token, token_id

    t, source = cfg.text, {}
    said = {k: hf_text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_text}
    has_files = any((src / f).is_file() for f in ("tokenizer.json", "vocab.json", "spiece.model"))
    if not has_files:
        if cfg.family == "siglip" and t.eos_token_id >= t.vocab_size:  # transformers' CLIP default
            t.eos_token_id = SIGLIP_DEFAULTS["text"]["eos_token_id"]
            source["eos_token_id"] = (f"SigLIP's SentencePiece </s> = {t.eos_token_id}, assumed: no tokenizer "
                                      f"files in the source; config.json's {said.get('eos_token_id')} is "
                                      f"outside the {t.vocab_size}-token vocabulary")
        source.setdefault("eos_token_id", "config.json text_config (no tokenizer files in the source)")
        source["pad_token_id"] = "config.json text_config (no tokenizer files in the source)"
        t.token_ids_from = source
        return
    tokenizer = (ClipTokenizer if cfg.family == "clip" else SiglipTokenizer)(src, t.context_length)
    where = "tokenizer.json" if (src / "tokenizer.json").is_file() else "vocab.json"
    if cfg.family == "siglip":
        where = "spiece.model"
        t.eos_token_id = tokenizer.eos_token_id
        source["eos_token_id"] = f"spiece.model '</s>' = {t.eos_token_id}"
        source["bos_token_id"] = "none: SigLIP's tokenizer adds no start token"
        source["unk_token_id"] = f"spiece.model '<unk>' = {tokenizer.special_ids['<unk>']}"
    elif t.eos_by_argmax:
        source["eos_token_id"] = "config.json text_config.eos_token_id = 2: transformers' legacy rule, pool at argmax(input_ids)"
    else:
        source["eos_token_id"] = "config.json text_config (CLIP pools at it, as transformers does)"
        if t.eos_token_id != tokenizer.eos_token_id:
            raise ConversionError(f"config.json: text_config.eos_token_id={t.eos_token_id} but the tokenizer's "
                                  f"<|endoftext|> has id {tokenizer.eos_token_id}; the tokenizer files belong "
                                  "to another model.")
    pad = declared_pad_token(src)
    pad_id = token_id(tokenizer, pad) if pad is not None else None
    if pad_id is not None:
        t.pad_token_id = pad_id
        source["pad_token_id"] = f"pad_token {pad!r} declared in the tokenizer files"
    else:  # without a declared pad token both upstream tokenizers pad with their end token
        t.pad_token_id = tokenizer.eos_token_id
        source["pad_token_id"] = f"the tokenizer's end token ({where}; no pad_token declared)"
    for name, value in said.items():
        if getattr(t, name, None) != value and name != "bos_token_id":
            source[name] += f"; config.json's {value} not used"
    if "bos_token_id" in said and cfg.family == "siglip":
        source["bos_token_id"] += f"; config.json's {said['bos_token_id']} not used"
    if tokenizer.vocab_size > t.vocab_size:
        raise ConversionError(f"{src}: the tokenizer has {tokenizer.vocab_size} tokens but the text embedding "
                              f"table has {t.vocab_size} rows; the tokenizer files belong to another model.")
    for name in ("eos_token_id", "pad_token_id"):
        if not 0 <= getattr(t, name) < t.vocab_size:
            raise ConversionError(f"{src}: the tokenizer's {name} is {getattr(t, name)}, outside the text "
                                  f"embedding table's {t.vocab_size} rows; the tokenizer files belong to another model.")
    t.token_ids_from = source


def convert_hf(src: str | Path, out: str | Path) -> Path:
    src = Path(src)
    if not (src / "config.json").is_file():
        raise ConversionError(f"{src}/config.json not found; --src must be a transformers checkpoint directory.")
    hf_config = json.loads((src / "config.json").read_text())
    cfg = convert_config(hf_config, *read_image_processor(src))
    set_token_ids(src, cfg, hf_config.get("text_config", {}))
    tensors = convert_state_dict(read_state_dict(find_weights(src)), cfg)
    extra = [src / f for f in COPIED_FILES if (src / f).is_file()]
    return write_checkpoint(cfg, tensors, out, extra)
