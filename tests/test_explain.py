"""Attention maps (eval/explain.py), their pictures and `python -m har_ref explain` on tiny checkpoints.

The maps are checked against computations written out here: SigLIP's probe attention from the head's
parameters, rollout on a two-block toy worked by hand (Abnar & Zuidema 2020, eq. 1), the spreading
onto the image and the pointing game on maps whose answer is known. The recomputed tower must give
the model's own embedding, and running it must leave the model's logits bit for bit as they were.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from har_ref import load_model, load_tokenizer
from har_ref.__main__ import main
from har_ref.data.prompts import PromptBank
from har_ref.data.classes import CLASS_NAMES
from har_ref.eval.embed import class_embeddings
from har_ref.eval.explain import (attention_map, box_share, class_maps, head_maps, pixel_mass, pointing_game, rollout,
                                  trace_image_tower)
from har_ref.eval.explain_viz import picture_names
from har_ref.model.transforms import build_transform, load_image

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ("clip", "siglip")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list:
    """Six 64x64 PNGs: a bright rectangle (a 'figure') at a different place on a noisy background each."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        pixels = rng.integers(60, 120, (64, 64, 3)).astype(np.uint8)
        x, y = 6 + 8 * i, 10 + 5 * i
        pixels[y:y + 20, x:x + 10] = rng.integers(150, 256, 3)
        paths.append(root / f"{i:04d}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def pixels_of(model, paths) -> torch.Tensor:
    transform = build_transform(model.cfg, train=False)
    return torch.stack([transform(load_image(p)) for p in paths])


def test_siglip_map_is_the_probe_attention_computed_from_the_head_parameters(tiny_weights):
    model = load_model(tiny_weights["siglip"]).double()
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    vision, head = model.vision, model.vision.head
    with torch.no_grad():  # the tokens the head reads, through the model's own (fused) blocks
        tokens = vision.ln_post(vision.transformer(vision.embed_patches(pixels) + vision.pos_embed)).numpy()
    D, h = tokens.shape[-1], head.heads
    d = D // h
    W, b = head.in_proj_weight.detach().numpy(), head.in_proj_bias.detach().numpy()
    q = (head.probe.detach().numpy()[0, 0] @ W[:D].T + b[:D]).reshape(h, d)
    k = (tokens @ W[D:2 * D].T + b[D:2 * D]).reshape(*tokens.shape[:2], h, d)
    logits = np.einsum("hd,bnhd->bhn", q, k) / np.sqrt(d)
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    grid = 64 // model.cfg.vision.patch_size
    got = head_maps(model, pixels)
    assert got.shape == (3, h, grid, grid)
    assert np.abs(got.reshape(3, h, -1).numpy() - expected).max() <= 1e-10  # measured 1.0e-17
    mean = attention_map(model, pixels).reshape(3, -1).numpy()
    assert np.abs(mean - expected.mean(1)).max() <= 1e-10


def test_rollout_on_a_two_block_toy_equals_the_hand_computation():
    """Class token + 2 patches. Block 1 (two heads, mean [[.5,.25,.25],[0,1,0],[.5,0,.5]]):
    A_hat1 = [[.75,.125,.125],[0,1,0],[.25,0,.75]]; block 2 A2 = [[.2,.8,0],[.5,.5,0],[0,0,1]]:
    A_hat2 = [[.6,.4,0],[.25,.75,0],[0,0,1]]. Row 0 of A_hat2 A_hat1 = .6 [.75,.125,.125] + .4 [0,1,0]
    = [.45, .475, .075]; without the class token, renormalized: [.475, .075] / .55 = [19/22, 3/22]."""
    head_a = [[1, 0, 0], [0, 1, 0], [1, 0, 0]]
    head_b = [[0, .5, .5], [0, 1, 0], [0, 0, 1]]
    block1 = torch.tensor([[head_a, head_b]], dtype=torch.float64)  # [B=1, heads=2, 3, 3]
    block2 = torch.tensor([[[[.2, .8, 0], [.5, .5, 0], [0, 0, 1]]]], dtype=torch.float64)
    got = rollout([block1, block2])
    assert torch.allclose(got, torch.tensor([[19 / 22, 3 / 22]], dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_traced_tower_gives_the_model_embedding(family, tiny_weights):
    model = load_model(tiny_weights[family]).double()
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        difference = (trace_image_tower(model.vision, pixels).embedding - model.encode_image(pixels)).abs().max()
    assert difference <= 1e-12  # measured 6.7e-16 (CLIP), 4.2e-16 (SigLIP)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_map_sums_to_1_over_the_patches(family, tiny_weights, photos):
    model = load_model(tiny_weights[family]).requires_grad_(False)  # frozen weights: class maps still work
    pixels = pixels_of(model, photos)
    class_emb = torch.nn.functional.normalize(torch.randn(4, model.cfg.embed_dim), dim=-1)
    maps = [attention_map(model, pixels), *class_maps(model, pixels, class_emb, [0, 3, torch.arange(6) % 4])]
    if family == "siglip":
        maps += list(head_maps(model, pixels).unbind(1))
    for m in maps:
        assert m.shape == (6, 8, 8) and m.min() >= 0
        assert (m.sum((1, 2)) - 1).abs().max() <= 1e-6  # float32: measured 1.2e-7 (CLIP), 1.8e-7 (SigLIP)


@pytest.mark.parametrize("family", FAMILIES)
def test_explaining_leaves_the_model_logits_bit_identical(family, tiny_weights, photos):
    model, tokenizer = load_model(tiny_weights[family]), load_tokenizer(tiny_weights[family])
    pixels = pixels_of(model, photos[:4])
    ids = tokenizer(["a photo of a person texting.", "a person running."])[0]
    with torch.no_grad():
        before = model(pixels, ids)
    class_emb = class_embeddings(model, tokenizer, PromptBank.from_file(None, list(CLASS_NAMES)), list(CLASS_NAMES))
    attention_map(model, pixels)
    class_maps(model, pixels, class_emb, [0, 1])
    with torch.no_grad():
        after = model(pixels, ids)
    assert torch.equal(before, after)
    assert not model.training and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_class_specific_maps_differ_for_two_classes(family, tiny_weights, photos, measured):
    model, tokenizer = load_model(tiny_weights[family]), load_tokenizer(tiny_weights[family])
    pixels = pixels_of(model, photos[:2])
    classes = list(CLASS_NAMES)
    class_emb = class_embeddings(model, tokenizer, PromptBank.from_file(None, classes), classes)
    texting, laptop = class_maps(model, pixels, class_emb, [classes.index("texting"), classes.index("using_laptop")])
    # total variation distance between the two distributions, per image
    distance = 0.5 * (texting - laptop).abs().sum((1, 2))
    measured(f"explain: {family} class maps texting vs using_laptop, total variation per image {distance.tolist()}")
    assert distance.min() >= 0.01  # measured 0.034, 0.043 (CLIP), 0.038, 0.042 (SigLIP): random tiny weights


def test_pixel_mass_keeps_the_mass_and_follows_the_centre_crop(tiny_weights):
    """A 100x50 image: CLIP resizes it to 128x64 and crops columns 32..96, i.e. x in [25, 75) of the
    image; SigLIP squashes the whole image. Each patch's mass lands on the pixels it was cut from."""
    clip, siglip = (load_model(tiny_weights[f]).cfg for f in FAMILIES)
    one_patch = np.zeros((8, 8))
    one_patch[0, 0] = 1.0
    mass = pixel_mass(one_patch, (100, 50), clip)
    assert mass.shape == (50, 100) and abs(mass.sum() - 1) <= 1e-12
    assert mass[:, :25].sum() == 0 and mass[:, 75:].sum() == 0
    assert np.allclose(mass[:6, 25:31], 1 / (6.25 * 6.25))  # patch (0, 0): x in [25, 31.25), y in [0, 6.25)
    uniform = pixel_mass(np.full((8, 8), 1 / 64), (100, 50), siglip, out_size=(40, 20))  # drawn smaller
    assert np.allclose(uniform, 1 / 800, rtol=0, atol=1e-15)


def test_pointing_game_on_maps_with_known_answers(tiny_weights):
    clip, siglip = (load_model(tiny_weights[f]).cfg for f in FAMILIES)
    one_patch = np.zeros((8, 8))
    one_patch[2, 3] = 1.0  # on a 64x64 image: x in [24, 32), y in [16, 24)
    assert box_share(one_patch, [24, 16, 32, 24], (64, 64), siglip) == pytest.approx(1, abs=1e-12)
    assert box_share(one_patch, [28, 0, 64, 64], (64, 64), clip) == pytest.approx(0.5, abs=1e-12)
    assert box_share(one_patch, [0, 0, 24, 64], (64, 64), clip) == 0
    maps = torch.from_numpy(np.stack([one_patch, np.full((8, 8), 1 / 64)]))
    shares, uniform = pointing_game(maps, [[24, 16, 32, 24], [0, 0, 32, 64]], [(64, 64), (64, 64)], siglip)
    assert np.allclose(shares, [1, 0.5]) and np.allclose(uniform, [1 / 64, 0.5])  # uniform: the box's area share
    shares, uniform = pointing_game(maps, [None, [0, 0, 128, 100]], [(64, 64), (128, 100)], clip)
    # CLIP sees x in [12.6, 113.8) of a 128x100 image: a box holding all of that holds all of any map
    assert np.isnan(shares[0]) and np.isnan(uniform[0]) and np.allclose([shares[1], uniform[1]], 1)


def test_picture_names_are_unique(tmp_path):
    paths = [tmp_path / "test" / "texting" / "0003.png", tmp_path / "test" / "running" / "0003.png",
             tmp_path / "test" / "running" / "a.jpg", tmp_path / "test" / "running" / "a.png"]
    assert list(picture_names(paths).values()) == ["texting--0003.png", "running--0003.png", "running--a.jpg.png",
                                                   "running--a.png.png"]
    assert picture_names(paths[:1]) == {paths[0]: "0003.png"}


def test_cli_writes_one_picture_per_image_for_both_families(tiny_weights, photos, tmp_path, capsys):
    folder = tmp_path / "user photos"
    folder.mkdir()
    rgba = Image.open(photos[0]).convert("RGBA").resize((97, 61))
    alpha = np.full((61, 97), 255, np.uint8)
    alpha[:, :20] = 0  # a transparent strip, composited onto white as predict does
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(folder / "odd size.png")
    (folder / "broken.jpg").write_text("not a JPEG")
    out = tmp_path / "maps"
    code = main(["explain", "--weights", str(tiny_weights["clip"]), "--weights", str(tiny_weights["siglip"]),
                 str(folder), str(photos[1]), "--out", str(out), "--class", "texting", "--class", "using_laptop"])
    stdout, stderr = capsys.readouterr()
    assert code == 0 and "Traceback" not in stderr
    assert stderr.splitlines() == [line for line in stderr.splitlines() if line.startswith("skipped")]
    assert stderr.startswith(f"skipped {folder / 'broken.jpg'}: UnidentifiedImageError")
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 2 and written[0].endswith("0001.png") and written[1].endswith("odd size.png")
    assert stdout.count("wrote ") == 2
    for name in written:
        with Image.open(out / name) as picture:
            assert picture.format == "PNG" and picture.width > 3 * 256  # the image and 3 maps per model


def test_cli_bad_class_exits_2_with_one_line(tiny_weights, photos, tmp_path, capsys):
    code = main(["explain", "--weights", str(tiny_weights["clip"]), str(photos[0]),
                 "--out", str(tmp_path / "maps"), "--class", "juggling"])
    _, stderr = capsys.readouterr()
    assert code == 2 and stderr.startswith("error: --class 'juggling' is not one of") and len(stderr.splitlines()) == 1
    assert not (tmp_path / "maps").exists()


def test_predict_panel_draws_each_model_map(tiny_weights, photos, tmp_path, capsys):
    panel = tmp_path / "panel.png"
    code = main(["predict", "--weights", str(tiny_weights["clip"]), "--weights", str(tiny_weights["siglip"]),
                 str(photos[2]), "--true", "texting", "--panel", str(panel)])
    stdout, stderr = capsys.readouterr()
    assert code == 0 and "Traceback" not in stderr and stdout.splitlines()[-1] == f"wrote {panel}"
    with Image.open(panel) as picture:
        assert picture.width >= 3 * 256  # the image, then CLIP's and SigLIP's maps beside it
        inferno_bright = np.asarray(picture.convert("RGB"))[:264, 264:].reshape(-1, 3)
        assert (inferno_bright[:, 0] > inferno_bright[:, 2] + 60).any()  # warm map colours, not grey
