"""`weights_conversion export-hf`: har_ref checkpoints written back as transformers directories.

Chain: random upstream CLIPModel / SiglipModel -> save_pretrained -> `weights_conversion hf` -> har_ref
-> export-hf -> CLIPModel / SiglipModel.from_pretrained. The re-loaded model must report no missing,
unexpected or mismatched keys and log nothing that loading the original directory does not log; its
weights must equal the original's bit for bit, and its embeddings must equal har_ref's and the original's
within test_model_parity's tolerance (L2-normalized embeddings 1e-5, logits 1e-4). An open_clip ViT-B-32
(exact GELU, argmax pooling, 0-padding) goes through `weights_conversion open_clip` instead.
The processors saved with it must give har_ref's pixels (PIL backend: exactly) and token ids.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (AutoProcessor, CLIPConfig, CLIPModel, CLIPTokenizer, SiglipConfig, SiglipModel,
                          SiglipTokenizer)

import har_ref
from har_ref.data.prompts import PromptBank
from har_ref.demo.synthetic import CLASS_NAMES
from har_ref.demo.tokenizer_training import train_clip_bpe, train_sentencepiece
from har_ref.model.transforms import build_transform
from test_model_parity import EMB_TOL, LOGIT_TOL, randomize, text_batch
from weights_conversion.__main__ import main
from weights_conversion.export_hf import export_hf
from weights_conversion.hf import convert_hf

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a photo of a person running.", "Two people HUGGING!", "a photo of " + "a very " * 40 + "tall person"]


@contextmanager
def transformers_log():
    """Every message transformers logs (warnings included) while the block runs."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def load_hf(model_class, directory):
    """(model in eval mode, log lines); fails on any missing, unexpected or mismatched key."""
    with transformers_log() as lines:
        model, info = model_class.from_pretrained(directory, output_loading_info=True)
    assert info == dict(missing_keys=set(), unexpected_keys=set(), mismatched_keys=set(), error_msgs=[]), info
    return model.eval(), lines


def max_diffs(a, b) -> tuple[float, float, float]:
    """Max |diff| of the normalized image and text embeddings and of the logits of two CLIPOutput-likes."""
    return tuple((getattr(a, n) - getattr(b, n)).abs().max().item()
                 for n in ("image_embeds", "text_embeds", "logits_per_image"))


def check_parity(hf_model, ours, pixel_values, input_ids, attention_mask, label, measured, original=None):
    """One transformers forward against har_ref's encoders (and the original upstream model's forward)."""
    with torch.no_grad():
        up = hf_model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        img, txt = ours.encode_image(pixel_values), ours.encode_text(input_ids, attention_mask)
        har = SimpleNamespace(image_embeds=F.normalize(img, dim=-1), text_embeds=F.normalize(txt, dim=-1),
                              logits_per_image=ours.logits(img, txt))
        references = {"har_ref": har}
        if original is not None:
            references["original"] = original(pixel_values=pixel_values, input_ids=input_ids,
                                              attention_mask=attention_mask)
    for name, reference in references.items():
        d = max_diffs(up, reference)
        measured(f"[export-hf] {label} vs {name}: image {d[0]:.2e}, text {d[1]:.2e}, logits {d[2]:.2e}")
        assert d[0] <= EMB_TOL and d[1] <= EMB_TOL and d[2] <= LOGIT_TOL
    return up


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "weights_conversion", *map(str, args)], capture_output=True,
                          text=True)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Small CLIP BPE and SigLIP SentencePiece tokenizers in transformers' own files."""
    root = tmp_path_factory.mktemp("tokenizers")
    texts = PromptBank.from_file(None, list(CLASS_NAMES)).all_prompts()[0]
    clip = train_clip_bpe(texts, root / "clip", vocab_size=700)
    siglip = train_sentencepiece(texts, root / "siglip", vocab_size=200)
    return dict(clip=(CLIPTokenizer.from_pretrained(root / "clip"), clip),
                siglip=(SiglipTokenizer(vocab_file=str(root / "siglip" / "spiece.model")), siglip))


def tiny_upstream(family, tok, act=None, eos_token_id=None):
    """Odd sizes (text width 40 != embedding width) with the tokenizer's vocabulary; the other special
    ids are what upstream's config writes by default (conversion takes them from the tokenizer files)."""
    torch.manual_seed(0)
    vision = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                  image_size=32, patch_size=8)
    text = dict(hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=5,
                vocab_size=tok["vocab_size"])
    if family == "clip":  # CLIP pools at eos_token_id (a model property): each test picks the rule it checks
        text.update(max_position_embeddings=24, eos_token_id=eos_token_id)
        return randomize(CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)))
    # SigLIP's text head maps to the image tower's width
    text.update(max_position_embeddings=16, hidden_act=act, projection_size=48)
    return randomize(SiglipModel(SiglipConfig(text_config=text, vision_config={**vision, "hidden_act": act})))


def round_trip(up, tokenizer, tmp_path, via_cli=False):
    """save_pretrained -> hf -> har_ref -> export-hf; returns (original dir, har_ref dir, exported dir)."""
    src, ours, back = tmp_path / "hf", tmp_path / "har_ref", tmp_path / "export"
    up.save_pretrained(src)
    if tokenizer is not None:
        tokenizer.save_pretrained(src)
    convert_hf(src, ours)
    if via_cli:
        # a training run directory: the checkpoint plus files export-hf must leave behind
        for name in ("classes.json", "prompts.json", "log.jsonl", "checkpoint/model.safetensors"):
            (ours / name).parent.mkdir(exist_ok=True)
            (ours / name).write_text("{}")
        done = run_cli("export-hf", "--src", ours, "--out", back)
        assert done.returncode == 0 and not done.stderr, done.stderr
        assert not {"classes.json", "log.jsonl", "checkpoint"} & {p.name for p in back.iterdir()}
    else:
        export_hf(ours, back)
    return src, ours, back


def photo_like(width, height, seed=0):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 6 + 1, width // 6 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR), dtype=int)
    return Image.fromarray(np.clip(smooth + rng.integers(-40, 40, (height, width, 3)), 0, 255).astype(np.uint8))


def check_processor(back, ours, model_class, label, measured):
    """The exported processor loads (AutoProcessor too) and gives har_ref's pixels and token ids."""
    cfg = har_ref.load_model(ours).cfg
    image = photo_like(45, 37)  # not square, not the model's size: resize and crop both matter
    expected = build_transform(cfg)(image)
    with transformers_log() as lines:
        exact = AutoProcessor.from_pretrained(back, backend="pil")
        default = AutoProcessor.from_pretrained(back)
    assert not lines, lines
    assert type(exact).__name__ == ("CLIPProcessor" if model_class is CLIPModel else "SiglipProcessor")
    assert torch.equal(exact(images=image, return_tensors="pt").pixel_values[0], expected)
    # transformers 5's default torchvision resize: within test_transforms' 8 uint8 levels
    d = (default(images=image, return_tensors="pt").pixel_values[0] - expected).abs().max().item()
    measured(f"[export-hf] {label} processor: PIL backend exact, torchvision backend max |diff| {d:.3f}")
    assert d <= 8 / 255 / min(cfg.image_std)
    ids, mask = har_ref.load_tokenizer(ours)(PROMPTS)
    text = exact(text=PROMPTS, padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(text.input_ids, ids) and torch.equal(text.attention_mask, mask)
    return ids, mask


@pytest.mark.parametrize("family, act, eos", [("clip", None, "tokenizer"), ("clip", None, 2),
                                              ("siglip", "gelu_pytorch_tanh", None), ("siglip", "gelu", None)],
                         ids=["clip-eos-first-occurrence", "clip-legacy-argmax", "siglip-tanh", "siglip-exact-gelu"])
def test_tiny_round_trip(tokenizers, tmp_path, family, act, eos, measured):
    tokenizer, tok = tokenizers[family]
    up = tiny_upstream(family, tok, act, tok["eos_token_id"] if eos == "tokenizer" else eos)
    model_class = CLIPModel if family == "clip" else SiglipModel
    src, ours, back = round_trip(up, tokenizer, tmp_path, via_cli=eos == 2)
    _, original_lines = load_hf(model_class, src)
    reloaded, lines = load_hf(model_class, back)
    assert not set(lines) - set(original_lines), lines
    assert reloaded.state_dict().keys() == up.state_dict().keys()
    assert all(torch.equal(v, up.state_dict()[k]) for k, v in reloaded.state_dict().items())
    label = f"tiny clip eos={eos}" if family == "clip" else f"tiny siglip act={act}"
    ids, mask = check_processor(back, ours, model_class, label, measured)
    # and a row without any end token: only there do CLIP's argmax and first-<eos> pooling differ
    ids = torch.cat([ids, torch.randint(3, tok["vocab_size"] - 2, (1, ids.shape[1]))])
    mask = torch.cat([mask, torch.ones_like(mask[:1])])
    x = torch.randn(ids.shape[0], 3, 32, 32)
    model = har_ref.load_model(ours)
    for m in (None, mask):
        check_parity(reloaded, model, x, ids, m, f"{label} mask={m is not None}", measured, original=up.eval())


@pytest.mark.parametrize("real_size", ["siglip"], indirect=True)
def test_real_size_siglip_round_trip(real_size, tmp_path, measured, capsys):
    """The session's real-size SiglipModel (tests/conftest.py::real_size: SiglipConfig() = base patch16 224,
    saved by save_pretrained without tokenizer files, converted once) exported back. (Real-size CLIP,
    ViT-B/32, is the open_clip test below; its transformers round trip is the tiny one above.)"""
    up, src, ours, back = real_size.up, real_size.hf, real_size.converted, tmp_path / "export"
    export_hf(ours, back)
    note = capsys.readouterr().out.splitlines()
    assert len(note) == 1 and note[0].startswith("note: no tokenizer written")
    _, original_lines = load_hf(SiglipModel, src)
    reloaded, lines = load_hf(SiglipModel, back)
    assert not set(lines) - set(original_lines), lines
    assert all(torch.equal(v, up.state_dict()[k]) for k, v in reloaded.state_dict().items())
    ids, mask = text_batch(32000, 64, eos_id=1, bos_id=None, eos_positions=[63, 6])
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    check_parity(reloaded, real_size.ours, x, ids, mask, "siglip real size", measured, up)


@pytest.mark.parametrize("real_size", ["open_clip"], indirect=True)
def test_open_clip_gelu_export(real_size, tmp_path, measured):
    """open_clip ViT-B-32 (nn.GELU, pools at argmax(ids), pads with 0; the session's real-size one from
    tests/conftest.py::real_size, converted once) -> har_ref -> transformers."""
    upstream = real_size.upstream
    prompts, x, ids = upstream["prompts"], upstream["images"], upstream["ids"]
    up_img, up_txt, _ = upstream["outputs"]["ViT-B-32"]
    ours, back = real_size.converted["ViT-B-32"], tmp_path / "export"
    assert main(["export-hf", "--src", str(ours), "--out", str(back)]) == 0
    config = json.loads((back / "config.json").read_text())
    assert config["vision_config"]["hidden_act"] == config["text_config"]["hidden_act"] == "gelu"
    reloaded, lines = load_hf(CLIPModel, back)
    assert not lines, lines
    tokens = AutoProcessor.from_pretrained(back)(text=prompts, padding="max_length", truncation=True,
                                                 return_tensors="pt")
    # open_clip's ids up to <|endoftext|>; transformers pads with <|endoftext|> where open_clip pads with 0
    ours_ids, mask = har_ref.load_tokenizer(ours)(prompts)
    assert torch.equal(ours_ids, ids) and torch.equal(tokens.attention_mask, mask)
    assert torch.equal(tokens.input_ids[mask.bool()], ids[mask.bool()]) and ids[0, -1] == 0
    # plus a row without <|endoftext|>, where pooling at argmax(ids) and at the first end token differ
    hf_ids = torch.cat([tokens.input_ids, torch.randint(1, 49406, (1, 77))])
    out = check_parity(reloaded, har_ref.load_model(ours), x, hf_ids, None, "open_clip ViT-B-32 gelu", measured)
    d = max((out.image_embeds - up_img).abs().max().item(), (out.text_embeds[:3] - up_txt).abs().max().item())
    measured(f"[export-hf] open_clip ViT-B-32 gelu vs open_clip: {d:.2e}")
    assert d <= EMB_TOL


def test_not_a_checkpoint_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    done = run_cli("export-hf", "--src", tmp_path, "--out", tmp_path / "out")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [f"error: {tmp_path}/config.json not found; --src must be a har_ref "
                                        "checkpoint directory (written by `python -m weights_conversion hf|open_clip` "
                                        "or `python -m har_ref train`)."]
    assert not (tmp_path / "out").exists()
    # a transformers directory, and a run that has only its epoch checkpoint so far
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "model.safetensors").write_text("")
    assert main(["export-hf", "--src", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "pass --src" in capsys.readouterr().err
    (tmp_path / "model.safetensors").write_text("")
    assert main(["export-hf", "--src", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "is a transformers checkpoint already" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_a_har_ref_training_run_exports(family, tmp_path, measured):
    """What a user exports: a run directory trained by har_ref (here the demo's tiny models with
    their own BPE / SentencePiece tokenizers, one epoch) loads in transformers and agrees with it."""
    from tiny_checkpoint import make_tiny_checkpoint
    from har_ref.demo.synthetic import generate
    from har_ref.train.loop import train
    from har_ref.train.config import TrainConfig

    generate(tmp_path / "data", train_per_class=2, test_per_class=1, image_size=32, seed=0)
    texts, _ = PromptBank.from_file(None, list(CLASS_NAMES)).all_prompts()
    weights = make_tiny_checkpoint(family, texts, tmp_path / "weights", seed=0)
    cfg = TrainConfig(model=family, epochs=1, micro_batch=8, accum_steps=1, xbm_size=0, lr=1e-3, warmup_steps=1,
                      precision="fp32", workers=0)
    train(cfg, weights, tmp_path / "data", tmp_path / "run")
    done = run_cli("export-hf", "--src", tmp_path / "run", "--out", tmp_path / "export")
    assert done.returncode == 0 and not done.stderr, done.stderr
    model_class = CLIPModel if family == "clip" else SiglipModel
    reloaded, _ = load_hf(model_class, tmp_path / "export")
    ids, mask = check_processor(tmp_path / "export", tmp_path / "run", model_class, f"trained {family} run", measured)
    ours = har_ref.load_model(tmp_path / "run")
    size = ours.cfg.vision.image_size
    x = torch.randn(ids.shape[0], 3, size, size)
    check_parity(reloaded, ours, x, ids, None, f"trained {family} run", measured)


@pytest.mark.parametrize("family, settings", [
    ("clip", dict(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, resample=2)),
    ("siglip", dict(size={"shortest_edge": 40}, do_center_crop=True, crop_size={"height": 32, "width": 32})),
], ids=["clip-shorter-side-40-crop-32-bilinear", "siglip-shorter-side-40-crop-32"])
def test_the_sources_resize_and_crop_survive_the_round_trip(tokenizers, tmp_path, family, settings, measured):
    """A checkpoint whose processor resizes to 40 and then crops the model's 32 x 32, saved with its model by
    CLIPProcessor / SiglipProcessor: its processor, har_ref and the exported processor give the same pixels."""
    from transformers import CLIPImageProcessor, CLIPProcessor, SiglipImageProcessor, SiglipProcessor

    tokenizer, tok = tokenizers[family]
    clip = family == "clip"
    up = tiny_upstream(family, tok, None if clip else "gelu_pytorch_tanh", tok["eos_token_id"] if clip else None)
    images = (CLIPImageProcessor if clip else SiglipImageProcessor)(**settings)
    processor = (CLIPProcessor if clip else SiglipProcessor)(image_processor=images, tokenizer=tokenizer)
    src, ours, back = round_trip(up, processor, tmp_path)
    exported = json.loads((back / "preprocessor_config.json").read_text())
    assert {name: exported[name] for name in settings} == settings
    check_processor(back, ours, CLIPModel if clip else SiglipModel, f"{family} resize 40 crop 32", measured)
    source, cfg = AutoProcessor.from_pretrained(src, backend="pil"), har_ref.load_model(ours).cfg
    for image in (photo_like(45, 37), photo_like(20, 70, seed=1)):  # landscape and portrait
        assert torch.equal(source(images=image, return_tensors="pt").pixel_values[0], build_transform(cfg)(image))
