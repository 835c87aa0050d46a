"""Image transforms: parity with transformers' image processors, augmentation, image loading.

Measured on photo-like noisy images of 30 odd sizes (transformers 5.x):
- CLIPImageProcessorPil / SiglipImageProcessorPil (PIL bicubic, as OpenAI's preprocess and
  transformers 4's default processors): max |difference| = 0, bit-identical float32.
- CLIPImageProcessor / SiglipImageProcessor (transformers 5's default: torchvision's antialiased
  bicubic on uint8 tensors) differ on rare pixels. Here: CLIP max 2 uint8 levels = 0.030
  normalised (mean 0.004 levels), SigLIP max 6 levels = 0.047 normalised (mean 0.06 levels);
  a sweep over 78 images reached 7 levels for both, on < 0.05% of pixels.
  Tolerance: 8 levels maximum, 0.1 level mean.
"""
import io

import numpy as np
import pytest
import torch
import transformers
from PIL import Image, ImageOps
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from har_ref.model.config import OPENAI_MEAN, OPENAI_STD, ModelConfig, clip_vit_b32, siglip_base_patch16_224
from har_ref.model.transforms import build_transform, load_image, normalize_uint8, to_uint8_resized


pytestmark = pytest.mark.usefixtures("one_thread")


CONFIGS = {"clip": clip_vit_b32(), "siglip": siglip_base_patch16_224()}
# Odd sizes and aspect ratios (width, height): tiny, 1-pixel strips, one off 224, very wide and tall.
SIZES = [(1, 1), (2, 3), (3, 2), (7, 5), (5, 700), (700, 5), (1, 160), (224, 224), (225, 223), (223, 225),
         (500, 333), (333, 500), (900, 11), (17, 31), (640, 480), (48, 48), (97, 1023), (256, 251)]


def photo_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Smooth colour field plus noise: exercises both the low-pass and the edges of bicubic."""
    coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR), dtype=int)
    return Image.fromarray(np.clip(smooth + rng.integers(-40, 40, (height, width, 3)), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    random_sizes = [tuple(int(s) for s in rng.integers(1, 700, 2)) for _ in range(12)]
    return [photo_like(w, h, rng) for w, h in SIZES + random_sizes]


@pytest.fixture(scope="module")
def eval_batches(images) -> dict[str, torch.Tensor]:
    """har_ref's eval transform of every image, per family (computed once: wide images are slow)."""
    return {family: torch.stack([build_transform(cfg)(image) for image in images])
            for family, cfg in CONFIGS.items()}


# preprocessor_config.json of openai/clip-vit-base-patch32 and google/siglip-base-patch16-224.
PREPROCESSOR_CONFIGS = {
    "clip": dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                 resample=3, rescale_factor=1 / 255, image_mean=[0.48145466, 0.4578275, 0.40821073],
                 image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True),
    "siglip": dict(size={"height": 224, "width": 224}, resample=3, rescale_factor=1 / 255,
                   image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
}


def processors(family: str):
    """transformers' PIL-backed and torchvision-backed (its default) image processors."""
    settings = PREPROCESSOR_CONFIGS[family]
    if family == "clip":
        return CLIPImageProcessorPil(**settings), transformers.CLIPImageProcessor(**settings)
    return SiglipImageProcessorPil(**settings), transformers.SiglipImageProcessor(**settings)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_eval_transform_equals_transformers(images, eval_batches, family):
    cfg = CONFIGS[family]
    pil_processor, torchvision_processor = processors(family)
    settings = PREPROCESSOR_CONFIGS[family]
    assert (list(cfg.image_mean), list(cfg.image_std)) == (settings["image_mean"], settings["image_std"])
    mine = eval_batches[family]
    assert mine.shape == (len(images), 3, 224, 224) and mine.dtype == torch.float32
    assert torch.equal(mine, pil_processor(images=images, return_tensors="pt").pixel_values)

    levels = (mine - torchvision_processor(images=images, return_tensors="pt").pixel_values).abs()
    levels *= 255 * torch.tensor(cfg.image_std).view(3, 1, 1)  # back to uint8 steps
    assert levels.max() <= 8 + 1e-3 and levels.mean() < 0.1


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_uint8_split_composes_to_eval_transform(images, eval_batches, family):
    cfg = CONFIGS[family]
    pixels = torch.stack([to_uint8_resized(image, cfg) for image in images[-12:]])
    assert pixels.dtype == torch.uint8 and pixels.shape == (12, 3, 224, 224)
    # Exact (stronger than the 1/255/std a uint8 cache could cost), batched as on a device.
    assert torch.equal(normalize_uint8(pixels, cfg), eval_batches[family][-12:])


def test_clip_resize_geometry():
    """A 448 x 224 image is resized to exactly its own shape / 1 and the centre crop is its middle."""
    cfg = CONFIGS["clip"]
    left = Image.new("RGB", (112, 224), (255, 0, 0))
    image = Image.new("RGB", (448, 224), (0, 0, 255))
    image.paste(left, (112, 0))  # red band at columns 112..223: the crop's left half
    pixels = to_uint8_resized(image, cfg)
    assert pixels[:, :, :112].tolist() == torch.tensor([255, 0, 0]).view(3, 1, 1).expand(3, 224, 112).tolist()
    assert (pixels[2, :, 112:] == 255).all()


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_augmentation(images, eval_batches, family):
    cfg = CONFIGS[family]
    transform = build_transform(cfg, train=True, augment=True)
    torch.manual_seed(0)
    first = torch.stack([transform(image) for image in images[:6]])
    torch.manual_seed(0)
    again = torch.stack([transform(image) for image in images[:6]])
    other = torch.stack([transform(image) for image in images[:6]])
    assert first.shape == (6, 3, 224, 224) and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.equal(first, other)
    low = (0 - torch.tensor(cfg.image_mean)) / torch.tensor(cfg.image_std)
    high = (1 - torch.tensor(cfg.image_mean)) / torch.tensor(cfg.image_std)
    assert (first >= low.view(3, 1, 1) - 1e-6).all() and (first <= high.view(3, 1, 1) + 1e-6).all()
    # Without augment (or outside training) the transform is the deterministic eval one.
    for train, augment in [(True, False), (False, True)]:
        assert torch.equal(build_transform(cfg, train, augment)(images[9]), eval_batches[family][9])


def test_augmentation_flips_and_crops():
    """Over many draws a left-red / right-blue image comes out mirrored about half the time."""
    cfg = CONFIGS["siglip"]
    image = Image.new("RGB", (200, 100), (0, 0, 255))
    image.paste(Image.new("RGB", (100, 100), (255, 0, 0)), (0, 0))
    transform = build_transform(cfg, train=True, augment=True)
    torch.manual_seed(1)
    red_on_left = [bool(transform(image)[0, 112, 0] > 0) for _ in range(40)]
    assert 10 <= sum(red_on_left) <= 30


def test_augmentation_resamples_with_the_checkpoints_filter():
    """The random crop uses cfg.resample: nearest neighbour (PIL filter 0) only copies pixels, so a black and
    white image stays black and white; bicubic (3) makes grey levels between them."""
    from dataclasses import replace

    image = Image.fromarray(np.random.default_rng(3).choice([0, 255], (90, 120, 3)).astype(np.uint8))
    for resample, only_black_and_white in [(0, True), (3, False)]:
        torch.manual_seed(0)
        x = build_transform(replace(CONFIGS["siglip"], resample=resample), train=True, augment=True)(image)
        levels = set(torch.round((x * 0.5 + 0.5) * 255).unique().tolist())  # SigLIP: mean = std = 0.5
        assert (levels <= {0.0, 255.0}) == only_black_and_white, resample


def test_load_image_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste(Image.new("RGB", (20, 20), (255, 0, 0)), (0, 0))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    loaded = load_image(tmp_path / "rotated.jpg")
    assert loaded.mode == "RGB" and loaded.size == (20, 40)
    top, bottom = np.asarray(loaded)[5, 10], np.asarray(loaded)[35, 10]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # red went to the top
    assert loaded.size == ImageOps.exif_transpose(Image.open(tmp_path / "rotated.jpg")).size


def test_colour_modes_are_converted_like_transformers(tmp_path):
    rng = np.random.default_rng(1)
    rgb = photo_like(61, 47, rng)
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (47, 61), dtype=np.uint8)))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 3
    variants = {"CMYK": rgb.convert("CMYK"), "L": rgb.convert("L"), "1": rgb.convert("1"), "RGBA": rgba,
                "LA": rgba.convert("LA"), "P": palette}
    for mode, image in variants.items():
        path = tmp_path / f"{mode.replace(';', '_')}.{'tiff' if mode == 'CMYK' else 'png'}"
        image.save(path)
        loaded = load_image(path)
        assert loaded.mode == "RGB" and loaded.size == (61, 47), mode
        for family in ("clip", "siglip"):  # the transform takes the raw mode too, as transformers does
            expected = processors(family)[0](images=[image], return_tensors="pt").pixel_values[0]
            assert torch.equal(build_transform(CONFIGS[family])(image), expected), (mode, family)
            assert torch.equal(build_transform(CONFIGS[family])(loaded), expected), (mode, family)
    # Transparent pixels become white, as in transformers 5.
    clear = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert (to_uint8_resized(clear, CONFIGS["siglip"]) == 255).all()


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image(tmp_path / "missing.jpg")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="cannot be read"):
        load_image(tmp_path / "text.jpg")
    buffer = io.BytesIO()
    photo_like(64, 64, np.random.default_rng(2)).save(buffer, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ValueError, match="cannot be read"):
        load_image(tmp_path / "truncated.jpg")


# preprocessor_config.json as the hub serves them (openai/clip-vit-base-patch32 was written by transformers'
# CLIPFeatureExtractor, with int sizes; google/siglip-base-patch16-224 by SiglipImageProcessor).
PUBLISHED = {
    "clip": {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
             "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
             "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224},
    "siglip": {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
               "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
               "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
               "size": {"height": 224, "width": 224}},
}


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_published_preprocessor_configs_convert_to_the_processors_pixels(images, eval_batches, family, tmp_path):
    """What conversion reads from the published files, and that it is the pixels transformers makes from them."""
    import json

    from weights_conversion.hf import convert_config, read_image_processor

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(PUBLISHED[family]))
    cfg = convert_config({"model_type": family}, *read_image_processor(tmp_path))
    settings = (cfg.resize, cfg.resize_size, cfg.center_crop, cfg.resample, cfg.image_mean, cfg.image_std)
    if family == "clip":
        assert settings == ("shortest_edge", 224, True, 3, OPENAI_MEAN, OPENAI_STD)
    else:
        assert settings == ("square", 224, False, 3, (0.5,) * 3, (0.5,) * 3)
    upstream = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    mine = torch.stack([build_transform(cfg)(image) for image in images[:10]])
    assert torch.equal(mine, upstream(images=images[:10], return_tensors="pt").pixel_values)
    assert torch.equal(mine, eval_batches[family][:10])  # and har_ref's built-in configs agree with them


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_config_written_before_the_resize_fields_keeps_its_transform(images, eval_batches, family, tmp_path):
    """A config.json without resize_size, center_crop and resample (written before they existed) loads
    with the transform it always had: the shorter side (CLIP) or both sides (SigLIP) to the model's size,
    a crop for CLIP only, bicubic."""
    import json

    spec = CONFIGS[family].to_dict()
    for name in ("resize_size", "center_crop", "resample"):
        spec.pop(name)
    (tmp_path / "config.json").write_text(json.dumps(spec))
    cfg = ModelConfig.load(tmp_path)
    assert (cfg.resize_size, cfg.resized_to, cfg.center_crop, cfg.resample) == (None, 224, family == "clip", 3)
    assert torch.equal(torch.stack([build_transform(cfg)(image) for image in images[:10]]), eval_batches[family][:10])
