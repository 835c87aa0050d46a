"""weights_conversion hf: every source tensor used once, every target filled, with one clear message."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel

from weights_conversion.common import ConversionError
from weights_conversion.hf import convert_config, convert_hf


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
    (tmp_path / "truncated.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    done = subprocess.run([sys.executable, "-m", "weights_conversion", "open_clip", "--src",
                           str(tmp_path / "truncated.safetensors"), "--arch", "ViT-B-32", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "is not a readable safetensors file" in done.stderr and len(done.stderr.strip().splitlines()) == 1


RESIZE, CROP = 40, 32  # preprocessor_config.json: shortest side to 40, then the centre 32 x 32 (the model's size)
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # not OpenAI's (the default when a checkpoint has none)


@pytest.fixture(scope="module")
def hub_clip(tmp_path_factory):
    """A directory laid out as the hub serves openai/clip-vit-base-patch32: CLIPModel (randomized weights, not
    transformers' std-0.02 init, under which attention is near uniform and a q/k mix-up hides),
    CLIPTokenizer on OpenAI's BPE, and preprocessor_config.json of a CLIPImageProcessor with its own mean
    and std whose resize (40) and crop (32) differ, each written by its save_pretrained; converted.
    Also returns the image processor and tokenizer objects."""
    import gzip

    from open_clip import tokenizer as open_clip_tokenizer
    from transformers import CLIPImageProcessor, CLIPTokenizer

    from har_ref.demo.tokenizer_training import bytes_to_unicode
    from test_model_parity import randomize

    root = tmp_path_factory.mktemp("hub_clip")
    lines = gzip.open(open_clip_tokenizer.default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab_dir = root / "vocab"
    vocab_dir.mkdir()
    (vocab_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (vocab_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=2, eos_token_id=2),  # as openai's config.json
                     vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=CROP, patch_size=16), projection_dim=16)
    up = randomize(CLIPModel(cfg)).eval()
    up.save_pretrained(root / "hf")
    tokenizer = CLIPTokenizer.from_pretrained(vocab_dir)
    tokenizer.save_pretrained(root / "hf")
    images = CLIPImageProcessor(size={"shortest_edge": RESIZE}, crop_size={"height": CROP, "width": CROP},
                                image_mean=list(MEAN), image_std=list(STD))
    images.save_pretrained(root / "hf")
    assert (root / "hf" / "preprocessor_config.json").is_file()
    return SimpleNamespace(up=up, hf=root / "hf", out=convert_hf(root / "hf", root / "out"), images=images,
                           tokenizer=tokenizer)


def test_full_hf_checkpoint_round_trip(hub_clip, measured):
    """The converted checkpoint tokenizes exactly as transformers does, normalizes images with the
    checkpoint's mean and std, and gives the same logits."""
    from har_ref import load_model, load_tokenizer

    up, hf_dir, out = hub_clip.up, hub_clip.hf, hub_clip.out
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    texts = ["This is a photo of a person texting.", "a photo of a person listening to music.", "Two people hugging!"]
    expected = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids, mask = load_tokenizer(out)(texts)
    assert torch.equal(ids, expected.input_ids) and torch.equal(mask, expected.attention_mask)
    assert int(ids[0, -1]) == 49407  # padded with <|endoftext|>, as transformers pads

    model = load_model(out)
    assert (model.cfg.image_mean, model.cfg.image_std) == (MEAN, STD)
    x = torch.randn(2, 3, CROP, CROP, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = up(pixel_values=x, input_ids=expected.input_ids).logits_per_image
        got = model(x, ids)
    worst = (got - ref).abs().max().item()
    measured(f"[hf round trip] CLIP logits max |har_ref - transformers| {worst:.2e} (logits span "
             f"{(ref.max() - ref.min()).item():.1f})")
    assert worst <= 1e-5  # measured 3.3e-6 (exp t ~ 7 times the embeddings' error)


def test_preprocessor_resize_and_crop_are_the_checkpoints(hub_clip):
    """An image of odd size through the saved preprocessor (PIL backend: pixel for pixel) and through
    har_ref's transform of the converted checkpoint: the same pixels, so the same logits."""
    from PIL import Image

    from har_ref import load_model
    from har_ref.model.transforms import build_transform

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 45, 3), dtype=np.uint8))  # neither side 32 nor 40
    expected = transformers.AutoImageProcessor.from_pretrained(hub_clip.hf, backend="pil")(
        images=image, return_tensors="pt").pixel_values[0]
    got = build_transform(load_model(hub_clip.out).cfg)(image)
    assert got.shape == expected.shape == (3, CROP, CROP)
    assert torch.equal(got, expected)


def test_a_processor_saved_by_transformers_keeps_its_normalization(hub_clip, tmp_path):
    """The same checkpoint with its tokenizer and image processor saved together, as CLIPProcessor does."""
    import shutil

    from transformers import CLIPProcessor

    from har_ref import load_model

    src = tmp_path / "hf"
    src.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hub_clip.hf / name, src / name)
    CLIPProcessor(image_processor=hub_clip.images, tokenizer=hub_clip.tokenizer).save_pretrained(src)
    cfg = load_model(convert_hf(src, tmp_path / "out")).cfg
    assert (cfg.image_mean, cfg.image_std) == (MEAN, STD)


def test_processor_config_wins_over_preprocessor_config_as_in_transformers(hub_clip, tmp_path):
    """A directory with both files (an image processor of other settings saved over a processor's): har_ref
    takes the settings transformers loads, processor_config.json's, and gives transformers' pixels."""
    import shutil

    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPProcessor

    from har_ref import load_model
    from har_ref.model.transforms import build_transform

    src = tmp_path / "hf"
    src.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hub_clip.hf / name, src / name)
    CLIPProcessor(image_processor=hub_clip.images, tokenizer=hub_clip.tokenizer).save_pretrained(src)
    CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": CROP, "width": CROP}).save_pretrained(src)
    assert {"processor_config.json", "preprocessor_config.json"} <= {p.name for p in src.iterdir()}
    cfg = load_model(convert_hf(src, tmp_path / "out")).cfg
    assert (cfg.image_mean, cfg.image_std, cfg.resize_size) == (MEAN, STD, RESIZE)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (37, 45, 3), dtype=np.uint8))
    expected = transformers.AutoImageProcessor.from_pretrained(src, backend="pil")(
        images=image, return_tensors="pt").pixel_values[0]
    assert torch.equal(build_transform(cfg)(image), expected)


def odd_images() -> list:
    """Photo-like noise at odd sizes: wider, taller, and smaller than the 32 x 32 crop (so it pads)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for w, h in [(45, 37), (37, 45), (20, 70), (7, 5), (33, 31), (120, 41)]]


# Image processors as users make them (the class's own arguments), each saved by save_pretrained, for a
# model that takes 32 x 32 images: every size and crop form and filter the two classes save.
PROCESSOR_FORMS = {
    "clip-shortest-40-crop-32-bilinear": ("clip", dict(size={"shortest_edge": 40}, crop_size=32, resample=2)),
    "clip-shortest-24-crop-32-pads": ("clip", dict(size=24, crop_size={"height": 32, "width": 32})),
    "clip-square-40-crop-32-lanczos": ("clip", dict(size={"height": 40, "width": 40}, crop_size=32, resample=1)),
    "clip-no-resize-crop-32-nearest": ("clip", dict(do_resize=False, crop_size=32, resample=0)),
    "clip-square-32-no-crop": ("clip", dict(size={"height": 32, "width": 32}, do_center_crop=False)),
    "siglip-square-32-box": ("siglip", dict(size={"height": 32, "width": 32}, resample=4)),
    "siglip-shortest-40-crop-32": ("siglip", dict(size={"shortest_edge": 40}, do_center_crop=True, crop_size=32)),
}


@pytest.mark.parametrize("form", PROCESSOR_FORMS)
def test_every_resize_and_crop_form_gives_transformers_pixels(form, tmp_path):
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    from har_ref.model.transforms import build_transform
    from weights_conversion.hf import read_image_processor

    family, settings = PROCESSOR_FORMS[form]
    (CLIPImageProcessor if family == "clip" else SiglipImageProcessor)(**settings).save_pretrained(tmp_path)
    cfg = convert_config({"model_type": family, "vision_config": {"image_size": 32}}, *read_image_processor(tmp_path))
    upstream = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    for image in odd_images():
        expected = upstream(images=image, return_tensors="pt").pixel_values[0]
        assert torch.equal(build_transform(cfg)(image), expected), (form, image.size)


@pytest.mark.parametrize("family, settings, message", [
    ("clip", dict(size={"shortest_edge": 40}, crop_size=24), "makes 24 x 24 images but the vision tower takes 32 x 32"),
    ("clip", dict(size={"shortest_edge": 32}, do_center_crop=False), "makes images of the input's shape"),
    ("siglip", dict(size={"height": 30, "width": 40}), r"size \{'height': 30, 'width': 40\} is not square"),
    ("siglip", dict(size={"longest_edge": 32}), "is not a size har_ref follows"),
    ("clip", dict(size=32, crop_size=32, do_normalize=False), "the only scaling har_ref has"),
], ids=["crop-not-the-model-size", "no-crop-no-square", "not-square", "longest-edge", "no-normalize"])
def test_an_image_processor_har_ref_cannot_follow_is_one_sentence(tmp_path, family, settings, message):
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": family, "vision_config": {"image_size": 32}}))
    (CLIPImageProcessor if family == "clip" else SiglipImageProcessor)(**settings).save_pretrained(src)
    done = subprocess.run([sys.executable, "-m", "weights_conversion", "hf", "--src", str(src),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("error: preprocessor_config.json: ") and re.search(message, done.stderr)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def siglip_with_processor(tmp_path_factory):
    """A tiny SiglipModel (randomized; 224 x 224 images in 7 x 7 patches) with a SiglipProcessor of the
    classes' own defaults, both saved by save_pretrained (transformers 5: processor_config.json); converted."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor, SiglipTokenizer

    from har_ref.demo.tokenizer_training import train_sentencepiece
    from test_model_parity import randomize

    root = tmp_path_factory.mktemp("siglip_with_processor")
    train_sentencepiece(["a photo of a person running.", "two people hugging", "arm wrestling", "café dancing"],
                        root / "vocab", vocab_size=60)
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)
    up = randomize(SiglipModel(SiglipConfig(text_config=dict(small, vocab_size=60, max_position_embeddings=16),
                                            vision_config=dict(small, image_size=224, patch_size=32)))).eval()
    up.save_pretrained(root / "hf")
    tokenizer = SiglipTokenizer(vocab_file=str(root / "vocab" / "spiece.model"), model_max_length=16)
    SiglipProcessor(image_processor=SiglipImageProcessor(), tokenizer=tokenizer).save_pretrained(root / "hf")
    return SimpleNamespace(up=up, hf=root / "hf", out=convert_hf(root / "hf", root / "out"))


def test_siglip_saved_with_its_processor_gives_transformers_pixels_and_logits(siglip_with_processor, measured):
    """An odd-size photo through the saved SiglipProcessor (PIL backend) and through har_ref: the same pixels
    and token ids, the same logits."""
    from PIL import Image

    from har_ref import load_model, load_tokenizer
    from har_ref.model.transforms import build_transform

    s = siglip_with_processor
    assert (s.hf / "processor_config.json").is_file() and not (s.hf / "preprocessor_config.json").exists()
    model = load_model(s.out)
    cfg = model.cfg
    assert (cfg.resize, cfg.resize_size, cfg.center_crop, cfg.resample) == ("square", 224, False, 3)
    assert (cfg.image_mean, cfg.image_std) == ((0.5,) * 3, (0.5,) * 3)
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8))
              for i, (w, h) in enumerate([(301, 173), (97, 250)])]
    texts = ["a photo of a person running.", "two people hugging"]
    processor = transformers.AutoProcessor.from_pretrained(s.hf, backend="pil")
    inputs = processor(text=texts, images=images, padding="max_length", truncation=True, return_tensors="pt")
    pixels = torch.stack([build_transform(cfg)(image) for image in images])
    ids, _ = load_tokenizer(s.out)(texts)
    assert torch.equal(pixels, inputs.pixel_values) and torch.equal(ids, inputs.input_ids)
    with torch.no_grad():
        expected = s.up(pixel_values=inputs.pixel_values, input_ids=inputs.input_ids).logits_per_image
        got = model(pixels, ids)
    worst = (got - expected).abs().max().item()
    measured(f"[hf processor] SigLIP saved with SiglipProcessor: logits max |har_ref - transformers| {worst:.2e} "
             f"(logits span {(expected.max() - expected.min()).item():.1f})")
    assert worst <= 5e-6  # measured 9.5e-7


@pytest.fixture(scope="module")
def saved_siglip(tmp_path_factory):
    """A tiny SiglipModel and SiglipTokenizer as save_pretrained writes them: config.json untouched, so its
    text_config carries transformers' defaults bos/eos = 49406/49407, not the SentencePiece </s> (1)."""
    from transformers import SiglipConfig, SiglipModel, SiglipTokenizer

    from har_ref.demo.tokenizer_training import train_sentencepiece

    root = tmp_path_factory.mktemp("saved_siglip")
    tok = train_sentencepiece(["a photo of a person running.", "two people hugging", "arm wrestling",
                               "café dancing"], root / "vocab", vocab_size=60)
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)
    SiglipModel(SiglipConfig(text_config=dict(small, vocab_size=tok["vocab_size"], max_position_embeddings=16),
                             vision_config=dict(small, image_size=16, patch_size=8))).save_pretrained(root / "hf")
    SiglipTokenizer(vocab_file=str(root / "vocab" / "spiece.model")).save_pretrained(root / "hf")
    text_config = json.loads((root / "hf" / "config.json").read_text())["text_config"]
    assert (text_config["bos_token_id"], text_config["eos_token_id"]) == (49406, 49407)  # what upstream writes
    return root / "hf"


def test_siglip_saved_by_transformers_converts_and_loads(saved_siglip, tmp_path):
    """The special-token ids come from spiece.model, and config.json says where each came from."""
    from har_ref import load_model, load_tokenizer

    done = subprocess.run([sys.executable, "-m", "weights_conversion", "hf", "--src", str(saved_siglip),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = json.loads((tmp_path / "out" / "config.json").read_text())["text"]
    assert text["eos_token_id"] == text["pad_token_id"] == 1
    assert text["token_ids_from"]["eos_token_id"].startswith("spiece.model '</s>' = 1; config.json's 49407 not used")
    assert "49406 not used" in text["token_ids_from"]["bos_token_id"]
    ids, _ = load_tokenizer(tmp_path / "out")(["arm wrestling"])
    assert 1 in ids[0].tolist()
    load_model(tmp_path / "out")


def test_siglip_converted_before_token_ids_from_still_loads(saved_siglip, tmp_path):
    """A directory converted before the ids came from the tokenizer (eos 49407, no token_ids_from) loads:
    SigLIP never reads that id, and it lies outside the embedding table; an id inside it that disagrees
    with the tokenizer is still refused."""
    from har_ref import load_tokenizer

    out = convert_hf(saved_siglip, tmp_path / "out")
    spec = json.loads((out / "config.json").read_text())
    spec["text"].pop("token_ids_from")
    spec["text"]["eos_token_id"] = 49407
    (out / "config.json").write_text(json.dumps(spec))
    load_tokenizer(out)
    spec["text"]["eos_token_id"] = 5
    (out / "config.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="text.eos_token_id=5 but the tokenizer's end token has id 1"):
        load_tokenizer(out)


def test_tokenizer_larger_than_the_embedding_table_is_one_sentence(saved_siglip, tmp_path):
    import shutil

    src = tmp_path / "hf"
    shutil.copytree(saved_siglip, src)
    spec = json.loads((src / "config.json").read_text())
    spec["text_config"]["vocab_size"] = 20
    (src / "config.json").write_text(json.dumps(spec))
    tamper(src, lambda sd: sd.__setitem__("text_model.embeddings.token_embedding.weight", torch.zeros(20, 32)))
    done = subprocess.run([sys.executable, "-m", "weights_conversion", "hf", "--src", str(src),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "the text embedding table has 20 rows" in done.stderr


def test_converted_config_states_the_t_and_b_the_weights_hold(saved_siglip, tmp_path):
    """A SiglipModel whose t and b moved away from their init (as after pretraining: google's b is about
    -12.9) converts to a config.json that states those values, not transformers' init values; a
    config.json written under the earlier field names (logit_scale_init, logit_bias_init) still loads."""
    import shutil

    from transformers import SiglipModel

    from har_ref import load_model

    src = tmp_path / "hf"
    upstream = SiglipModel.from_pretrained(saved_siglip)
    with torch.no_grad():
        upstream.logit_scale.fill_(4.7)
        upstream.logit_bias.fill_(-12.9)
    upstream.save_pretrained(src)
    for tokenizer_file in saved_siglip.glob("*"):
        if not (src / tokenizer_file.name).exists():
            shutil.copy(tokenizer_file, src)
    out = convert_hf(src, tmp_path / "out")
    spec = json.loads((out / "config.json").read_text())
    want_t, want_b = torch.tensor(4.7).item(), torch.tensor(-12.9).item()  # the float32 values the tensors hold
    assert (spec["logit_scale"], spec["logit_bias"]) == (want_t, want_b)
    assert "logit_bias_init" not in spec and "logit_scale_init" not in spec
    model = load_model(out)
    assert (model.logit_scale.item(), model.logit_bias.item()) == (want_t, want_b)
    spec["logit_scale_init"], spec["logit_bias_init"] = spec.pop("logit_scale"), spec.pop("logit_bias")
    (out / "config.json").write_text(json.dumps(spec))
    old = load_model(out)
    assert (old.cfg.logit_scale, old.cfg.logit_bias) == (want_t, want_b)
    assert (old.logit_scale.item(), old.logit_bias.item()) == (want_t, want_b)
