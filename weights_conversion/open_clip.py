"""open_clip / OpenAI state dict (ViT-B-32, ViT-B-16-SigLIP) -> har_ref checkpoint directory.

Input: one state-dict file, as open_clip's `model.state_dict()` (safetensors, or a plain
pickled dict read with weights_only=True), including OpenAI's own weights once taken out of
their TorchScript archive. Output: har_ref's config.json and model.safetensors (float32), and
for CLIP with `--bpe` the tokenizer as transformers' CLIPTokenizer files (vocab.json, merges.txt).

open_clip's CLIP layout (open_clip/model.py: CLIP, open_clip/transformer.py: VisionTransformer) differs
from har_ref's only in names and in two projections that are applied as `x @ proj`:

    visual.conv1                               -> vision.patch_embed (no bias)
    visual.class_embedding, .positional_embedding -> vision.class_token, .pos_embed
    {visual.,}transformer.resblocks.{i}.ln_1, .attn.in_proj_*, .attn.out_proj, .ln_2, .mlp.c_fc, .mlp.c_proj
                                               -> {vision,text}.transformer.blocks.{i}.ln1, .attn.qkv,
                                                  .attn.out, .ln2, .mlp.fc1, .mlp.fc2
    visual.proj, text_projection [width, embed] -> {vision,text}.proj.weight [embed, width] (transposed)

torch.nn.MultiheadAttention's in_proj rows are already q | k | v, har_ref's qkv order.
ViT-B-16-SigLIP's image tower is timm's vit_base_patch16_siglip_224 under `visual.trunk.`;
its text tower is open_clip's, nested under `text.` (open_clip's CustomTextCLIP).
"""
from __future__ import annotations

import gzip
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import torch

from har_ref.model.config import ModelConfig, clip_vit_b32, siglip_base_patch16_224
from har_ref.model.tokenizer import bytes_to_unicode

from .common import ConversionError, KeyMapper, read_state_dict, write_checkpoint

ARCHS = ("ViT-B-32", "ViT-B-32-quickgelu", "ViT-B-16-SigLIP")
# Entries of a state dict that are not weights, dropped by name: OpenAI's archive stores its
# hyper-parameters as scalar tensors, and older open_clip versions saved the causal mask.
NOT_WEIGHTS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
# CLIP's BPE: 256 byte symbols, the same with the end-of-word marker, 48894 merges, 2 specials.
NUM_MERGES = 49152 - 256 - 2
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")  # transformers' spelling; ids 49406, 49407


def arch_config(arch: str) -> ModelConfig:
    """har_ref's config for an open_clip architecture (open_clip/model_configs/{arch}.json).

    Sizes and epsilons are those of the presets in har_ref.model.config (KeyMapper.finish checks every
    tensor shape against them). What differs is the activation: open_clip builds nn.GELU (exact)
    unless the config says quick_gelu, and timm's trunk always uses nn.GELU.
      ViT-B-32            exact GELU
      ViT-B-32-quickgelu  QuickGELU: OpenAI's training, used by open_clip for pretrained='openai'
      ViT-B-16-SigLIP     exact GELU, where big_vision and transformers use the tanh approximation
    """
    if arch in ("ViT-B-32", "ViT-B-32-quickgelu"):
        act = "quick_gelu" if arch == "ViT-B-32-quickgelu" else "gelu"
        cfg = clip_vit_b32()
        # open_clip pools the text at argmax(ids) (<|endoftext|> has the largest id) and pads with 0.
        text = replace(cfg.text, act=act, eos_token_id=49407, eos_by_argmax=True, pad_token_id=0)
        return replace(cfg, vision=replace(cfg.vision, act=act), text=text)
    if arch == "ViT-B-16-SigLIP":
        cfg = siglip_base_patch16_224()
        return replace(cfg, vision=replace(cfg.vision, act="gelu"), text=replace(cfg.text, act="gelu"))
    raise ConversionError(f"--arch {arch!r} is not supported; use one of {', '.join(ARCHS)}.")


def _map_modules(m: KeyMapper, names: dict[str, str], params: tuple[str, ...] = ("weight", "bias")) -> None:
    """Same tensors under another module name: {source module: har_ref module}."""
    for src, dst in names.items():
        for p in params:
            m.put(f"{dst}.{p}", m.take(f"{src}.{p}"))


def _map_resblocks(m: KeyMapper, src: str, dst: str, layers: int) -> None:
    """open_clip's ResidualAttentionBlock stack: both CLIP towers and SigLIP's text tower."""
    for i in range(layers):
        s, d = f"{src}.resblocks.{i}", f"{dst}.blocks.{i}"
        _map_modules(m, {f"{s}.ln_1": f"{d}.ln1", f"{s}.attn.out_proj": f"{d}.attn.out", f"{s}.ln_2": f"{d}.ln2",
                         f"{s}.mlp.c_fc": f"{d}.mlp.fc1", f"{s}.mlp.c_proj": f"{d}.mlp.fc2"})
        m.put(f"{d}.attn.qkv.weight", m.take(f"{s}.attn.in_proj_weight"))
        m.put(f"{d}.attn.qkv.bias", m.take(f"{s}.attn.in_proj_bias"))


def _map_clip(m: KeyMapper, cfg: ModelConfig, t: str) -> None:
    """t: the text tower's prefix, '' in CLIP's layout, 'text.' in CustomTextCLIP's."""
    m.put("vision.patch_embed.weight", m.take("visual.conv1.weight"))
    m.put("vision.class_token", m.take("visual.class_embedding"))
    m.put("vision.pos_embed", m.take("visual.positional_embedding"))
    _map_resblocks(m, "visual.transformer", "vision.transformer", cfg.vision.layers)
    _map_modules(m, {"visual.ln_pre": "vision.ln_pre", "visual.ln_post": "vision.ln_post",
                     f"{t}ln_final": "text.ln_final"})
    m.put("vision.proj.weight", m.take("visual.proj").t())  # applied as x @ proj upstream, a Linear here
    m.put("text.token_embed.weight", m.take(f"{t}token_embedding.weight"))
    m.put("text.pos_embed", m.take(f"{t}positional_embedding"))
    _map_resblocks(m, f"{t}transformer", "text.transformer", cfg.text.layers)
    m.put("text.proj.weight", m.take(f"{t}text_projection").t())


def _map_siglip(m: KeyMapper, cfg: ModelConfig) -> None:
    """timm's VisionTransformer (global_pool='map') + open_clip's bidirectional TextTransformer."""
    v = "visual.trunk"
    _map_modules(m, {f"{v}.patch_embed.proj": "vision.patch_embed", f"{v}.norm": "vision.ln_post"})
    m.put("vision.pos_embed", m.take(f"{v}.pos_embed").squeeze(0))  # timm keeps a batch dim
    for i in range(cfg.vision.layers):
        s, d = f"{v}.blocks.{i}", f"vision.transformer.blocks.{i}"
        _map_modules(m, {f"{s}.norm1": f"{d}.ln1", f"{s}.attn.qkv": f"{d}.attn.qkv",  # fused q | k | v
                         f"{s}.attn.proj": f"{d}.attn.out", f"{s}.norm2": f"{d}.ln2",
                         f"{s}.mlp.fc1": f"{d}.mlp.fc1", f"{s}.mlp.fc2": f"{d}.mlp.fc2"})
    # timm's AttentionPoolLatent keeps q and kv as two Linears; the head's in_proj fuses them q | k | v.
    p = f"{v}.attn_pool"
    m.put("vision.head.probe", m.take(f"{p}.latent"))
    m.put("vision.head.in_proj_weight", torch.cat([m.take(f"{p}.q.weight"), m.take(f"{p}.kv.weight")]))
    m.put("vision.head.in_proj_bias", torch.cat([m.take(f"{p}.q.bias"), m.take(f"{p}.kv.bias")]))
    _map_modules(m, {f"{p}.proj": "vision.head.out_proj", f"{p}.norm": "vision.head.ln",
                     f"{p}.mlp.fc1": "vision.head.mlp.fc1", f"{p}.mlp.fc2": "vision.head.mlp.fc2"})
    m.put("text.token_embed.weight", m.take("text.token_embedding.weight"))
    m.put("text.pos_embed", m.take("text.positional_embedding"))
    _map_resblocks(m, "text.transformer", "text.transformer", cfg.text.layers)
    _map_modules(m, {"text.ln_final": "text.ln_final", "text.text_projection": "text.proj"})
    m.put("logit_bias", m.take("logit_bias").reshape(()))


def convert_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """open_clip key names -> har_ref key names; raises ConversionError naming every mismatch."""
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DistributedDataParallel wrapper
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    m = KeyMapper(sd, ignore=NOT_WEIGHTS)
    if cfg.family == "clip":
        # CustomTextCLIP (and open_clip's convert_to_custom_text_state_dict) nest the text tower under `text.`
        _map_clip(m, cfg, "text." if "text.text_projection" in sd else "")
    else:
        _map_siglip(m, cfg)
    m.put("logit_scale", m.take("logit_scale").reshape(()))  # 0-d, or [1] with nonscalar_logit_scale
    return m.finish(cfg)


def _reject_torchscript(path: Path) -> None:
    """OpenAI's ViT-B-32.pt is a TorchScript archive; say how to take its state dict out."""
    if path.suffix != ".safetensors" and zipfile.is_zipfile(path):  # False for a missing file
        with zipfile.ZipFile(path) as z:
            if any("/code/" in name for name in z.namelist()):
                raise ConversionError(
                    f"{path} is a TorchScript archive, not a state dict; extract its weights once with "
                    "`python -c \"import torch, safetensors.torch as st; st.save_file({k: v.contiguous() "
                    f"for k, v in torch.jit.load('{path}').state_dict().items()}}, 'ViT-B-32.safetensors')\"` "
                    "and pass that file with --arch ViT-B-32-quickgelu.")


def clip_tokenizer_files(bpe: str | Path) -> tuple[dict[str, int], list[str]]:
    """open_clip's gzipped BPE merges -> (vocab, merges) with SimpleTokenizer's ids, in CLIPTokenizer's form."""
    bpe = Path(bpe)
    try:
        lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"{bpe} is not a readable gzipped BPE file ({e}); pass open_clip's "
                              "bpe_simple_vocab_16e6.txt.gz with --bpe.") from e
    merges = lines[1:NUM_MERGES + 1]  # line 0 is a version header, as in SimpleTokenizer
    if len(merges) != NUM_MERGES or any(len(mg.split()) != 2 for mg in merges):
        raise ConversionError(f"{bpe} does not hold CLIP's {NUM_MERGES} BPE merges; pass open_clip's "
                              "bpe_simple_vocab_16e6.txt.gz with --bpe.")
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(mg.split()) for mg in merges] + list(SPECIAL_TOKENS)
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_tokenizer(vocab: dict[str, int], merges: list[str], out: Path) -> None:
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # transformers (and tokenizers' BPE.from_file) skip a leading "#version" line of merges.txt
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def convert_open_clip(src: str | Path, arch: str, out: str | Path, bpe: str | Path | None = None) -> Path:
    """Convert an open_clip/OpenAI state dict file of architecture `arch` into a har_ref checkpoint directory."""
    src, out = Path(src), Path(out)
    cfg = arch_config(arch)
    if bpe is not None and cfg.family != "clip":
        raise ConversionError(f"--bpe is CLIP's tokenizer; {arch} uses a SentencePiece model: "
                              "leave --bpe out and copy that model's spiece.model into the output directory.")
    tokenizer = clip_tokenizer_files(bpe) if bpe is not None else None  # fail before writing anything
    _reject_torchscript(src)
    sd = read_state_dict(src)
    if "input_resolution" in sd and cfg.vision.act != "quick_gelu":
        raise ConversionError(f"{src} is an OpenAI checkpoint, trained with QuickGELU; "
                              "convert it with --arch ViT-B-32-quickgelu.")
    write_checkpoint(cfg, convert_state_dict(sd, cfg), out)
    if tokenizer is not None:
        write_tokenizer(*tokenizer, out)
    elif cfg.family == "clip":
        print(f"note: {out} has no tokenizer; add vocab.json and merges.txt by converting again with "
              "--bpe PATH/bpe_simple_vocab_16e6.txt.gz (shipped inside the open_clip_torch package).")
    else:
        print(f"note: {out} has no tokenizer; copy SigLIP's SentencePiece model (spiece.model, as in "
              "google/siglip-base-patch16-224, the same big_vision checkpoint) into it.")
    return out
