"""`weights_conversion open_clip`: open_clip models converted to har_ref compute the same thing.

open_clip's real-size ViT-B-32 is built with random weights (seeded, randomized as in
test_model_parity.py so that attention is far from uniform), saved as open_clip saves it, converted
through the CLI (once per session: tests/conftest.py::real_size), and loaded with `har_ref.load_model`.
Both activations are checked: `ViT-B-32` (nn.GELU) from safetensors, and `ViT-B-32-quickgelu` (OpenAI's)
from a plain torch.save'd dict carrying OpenAI's scalar metadata keys. `ViT-B-16-SigLIP` (timm trunk)
is converted from its in-memory state dict (the file path is the same code).
Tolerances (fp32): test_model_parity.py's; the differences are in the "measured" section of the summary.
"""
from __future__ import annotations

import gzip
import json
import zipfile

import open_clip
import pytest
import torch
import torch.nn.functional as F
import transformers
from open_clip.model import convert_to_custom_text_state_dict
from open_clip.tokenizer import SimpleTokenizer

import har_ref
from har_ref.model.dual_encoder import DualEncoder
from weights_conversion.__main__ import main
from weights_conversion.common import ConversionError
from weights_conversion.open_clip import arch_config, convert_open_clip, convert_state_dict

from test_model_parity import EMB_TOL, LOGIT_TOL, randomize  # measured here: <= 1.6e-7 and 1e-6

ARCHS = ("ViT-B-32", "ViT-B-32-quickgelu")
OPENAI_METADATA = dict(input_resolution=torch.tensor(224), context_length=torch.tensor(77),
                       vocab_size=torch.tensor(49408))

# the real-size ViT-B-32 of tests/conftest.py::real_size, built once per session
OPEN_CLIP = pytest.mark.parametrize("real_size", ["open_clip"], indirect=True)


@pytest.fixture()
def upstream(real_size):
    """Seeded open_clip weights, inputs, and open_clip's outputs under each activation."""
    return real_size.upstream


@pytest.fixture()
def converted(real_size):
    """arch -> har_ref checkpoint directory written by the CLI."""
    return real_size.converted


@OPEN_CLIP
@pytest.mark.parametrize("arch", ARCHS)
def test_embeddings_and_logits_match_open_clip(upstream, converted, arch, measured):
    ours = har_ref.load_model(converted[arch])
    with torch.no_grad():
        img = F.normalize(ours.encode_image(upstream["images"]), dim=-1)
        txt = F.normalize(ours.encode_text(upstream["ids"]), dim=-1)  # open_clip's ids, 0-padded
        logits = ours.logits(img, txt)
    up_img, up_txt, up_logits = upstream["outputs"][arch]
    d_img = (img - up_img).abs().max().item()
    d_txt = (txt - up_txt).abs().max().item()
    d_log = (logits - up_logits).abs().max().item()
    measured(f"[open_clip parity] {arch}: image {d_img:.2e}, text {d_txt:.2e}, logits {d_log:.2e}")
    assert d_img <= EMB_TOL and d_txt <= EMB_TOL and d_log <= LOGIT_TOL
    # the tolerance is meaningful: the same weights under the other activation are far off
    other_img, other_txt, _ = upstream["outputs"][ARCHS[1 - ARCHS.index(arch)]]
    assert (img - other_img).abs().max() > 1e-3 and (txt - other_txt).abs().max() > 1e-3


def test_siglip_matches_open_clip(measured):
    torch.manual_seed(0)
    up = randomize(open_clip.create_model("ViT-B-16-SigLIP", pretrained=None)).eval()  # not timm's std-0.02 init
    images = torch.randn(2, 3, 224, 224)
    ids = torch.randint(2, 32000, (2, 64))
    ids[0, 10:] = 1  # SigLIP pads with </s> (id 1) to 64 and pools the last position
    with torch.no_grad():
        up_img = up.encode_image(images, normalize=True)
        up_txt = up.encode_text(ids, normalize=True)
        up_logits = up.logit_scale.exp() * up_img @ up_txt.T + up.logit_bias
    cfg = arch_config("ViT-B-16-SigLIP")
    with torch.device("meta"):
        ours = DualEncoder(cfg)
    ours.load_state_dict(convert_state_dict(up.state_dict(), cfg), assign=True)  # strict
    del up
    with torch.no_grad():
        img = F.normalize(ours.encode_image(images), dim=-1)
        txt = F.normalize(ours.encode_text(ids), dim=-1)
        logits = ours.logits(img, txt)
    d_img = (img - up_img).abs().max().item()
    d_txt = (txt - up_txt).abs().max().item()
    d_log = (logits - up_logits).abs().max().item()
    measured(f"[open_clip parity] ViT-B-16-SigLIP: image {d_img:.2e}, text {d_txt:.2e}, logits {d_log:.2e}")
    assert d_img <= EMB_TOL and d_txt <= EMB_TOL and d_log <= LOGIT_TOL


@OPEN_CLIP
@pytest.mark.parametrize("tamper, key", [
    (lambda sd: sd.pop("visual.transformer.resblocks.3.attn.in_proj_bias"),
     "visual.transformer.resblocks.3.attn.in_proj_bias"),
    (lambda sd: sd.update({"visual.extra_token": torch.zeros(768)}), "visual.extra_token"),
    (lambda sd: sd.update({"visual.proj": torch.zeros(768, 256)}), "vision.proj.weight"),
    (lambda sd: sd.update({"positional_embedding": torch.zeros(64, 512)}), "text.pos_embed"),
], ids=["missing", "extra", "wrong-embed-dim", "wrong-context"])
def test_mismatched_tensor_fails_naming_the_key(upstream, tamper, key):
    sd = dict(upstream["state_dict"])
    tamper(sd)
    with pytest.raises(ConversionError, match="conversion stopped") as err:
        convert_state_dict(sd, arch_config("ViT-B-32"))
    assert key in str(err.value)


@OPEN_CLIP
def test_ddp_and_custom_text_layouts_convert_identically(upstream):
    sd = upstream["state_dict"]
    cfg = arch_config("ViT-B-32")
    plain = convert_state_dict(sd, cfg)
    for variant in ({f"module.{k}": v for k, v in sd.items()}, convert_to_custom_text_state_dict(sd)):
        other = convert_state_dict(variant, cfg)
        assert other.keys() == plain.keys() and all(torch.equal(other[k], plain[k]) for k in plain)


def test_openai_weights_require_quickgelu(tmp_path):
    src = tmp_path / "openai.pt"
    torch.save(OPENAI_METADATA, src)
    with pytest.raises(ConversionError, match="ViT-B-32-quickgelu"):
        convert_open_clip(src, "ViT-B-32", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_torchscript_archive_is_refused_with_instructions(tmp_path):
    src = tmp_path / "ViT-B-32.pt"
    with zipfile.ZipFile(src, "w") as z:  # the layout torch.jit.save writes
        z.writestr("model/code/__torch__/model.py", "")
        z.writestr("model/data.pkl", b"")
    with pytest.raises(ConversionError, match="TorchScript archive.*torch.jit.load"):
        convert_open_clip(src, "ViT-B-32-quickgelu", tmp_path / "out")


TOKENIZER_TEXTS = [
    "a photo of a person running", "A PHOTO OF A CAT", "  leading and   multiple   spaces ",
    "it's, they're, we'll, I'd, you've, I'm", "numbers 12345 and 3.14", "café naïve résumé",
    "ÄÖÜ upper umlauts", "emoji 😀 👍🏽", "中文 and 日本語", "hyphen-ated under_score words",
    "punctuation!!! ??? ...", "tab\tand\nnewline", 'quotes "double" and \'single\'',
    "email@example.com http://x.org/a?b=c", "person riding a horse", "sitting", "a", "",
    "ALL CAPS Mixed Case", "word " * 100,  # the last one is truncated to 77 tokens
]


@OPEN_CLIP
def test_bpe_files_load_in_transformers_with_open_clip_ids(converted):
    out = converted["ViT-B-32"]
    # the vocabulary is SimpleTokenizer's, with transformers' names for the two special tokens
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    simple = {names.get(tok, tok): i for tok, i in SimpleTokenizer().encoder.items()}
    assert json.loads((out / "vocab.json").read_text(encoding="utf-8")) == simple
    tok = transformers.CLIPTokenizer.from_pretrained(out)
    ours = tok(TOKENIZER_TEXTS, truncation=True, max_length=77)["input_ids"]
    upstream = open_clip.tokenize(TOKENIZER_TEXTS)  # padded with 0 to 77
    for text, ids, up in zip(TOKENIZER_TEXTS, ours, upstream):
        assert ids == up[:len(ids)].tolist() and not up[len(ids):].any(), text
    # har_ref's own tokenizer on the converted checkpoint: open_clip's ids, padding (0) included
    ids, _ = har_ref.load_tokenizer(out)(TOKENIZER_TEXTS)
    assert torch.equal(ids, upstream)


def test_bad_bpe_file_fails_before_writing(tmp_path):
    bpe = tmp_path / "vocab.txt.gz"
    bpe.write_bytes(gzip.compress(b"#version: 0.2\nh e\n"))
    with pytest.raises(ConversionError, match="BPE merges"):
        convert_open_clip(tmp_path / "missing.safetensors", "ViT-B-32", tmp_path / "out", bpe=bpe)
    assert not (tmp_path / "out").exists()


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["open_clip", "--help"])
    assert exit_.value.code == 0
    assert "ViT-B-32-quickgelu" in capsys.readouterr().out
