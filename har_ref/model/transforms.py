"""Image preprocessing, pixel for pixel as the checkpoint's upstream image processor.

The eval transform is transformers' CLIPImageProcessorPil / SiglipImageProcessorPil with the settings
conversion read from the checkpoint (weights_conversion/hf.py::image_settings), S = vision.image_size:
    convert to RGB, compositing any transparency onto white as transformers does;
    resize with the PIL filter cfg.resample: cfg.resize "shortest_edge" takes the shorter side to
    cfg.resize_size (the longer to int(n * long / short)), "square" takes the image to n x n, "none" keeps it;
    if cfg.center_crop, the centre S x S (zero-padded where the image is smaller, as transformers pads);
    x / 255, (x - mean) / std.
Published checkpoints: openai/clip-vit-base-patch32 resizes the shorter side to 224 and crops 224 x 224
with OpenAI's mean and std (OpenAI's `preprocess` too); google/siglip-base-patch16-224 resizes to 224 x 224
without a crop, mean = std = 0.5. Both resample bicubic.

The pipeline is split at the uint8 image, `to_uint8_resized` then `normalize_uint8`, so that a
cache can store uint8 pixels and normalise on the device; the composition *is* the eval transform.

transformers 5's default CLIPImageProcessor / SiglipImageProcessor resize uint8 tensors with
torchvision's antialiased bicubic instead of PIL's; tests/test_transforms.py measures the gap.

Training augmentation (augment=True): RandomResizedCrop(S, scale=(0.6, 1.0)) of the whole image with the
checkpoint's filter, and a random horizontal flip, then the same normalisation. It replaces the eval
resize and crop: the random crops span what the eval crop shows and more.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

from .config import ModelConfig


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of `image`; transparent pixels are composited onto white (transformers' convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


# Pillow warns (and decodes) between MAX_IMAGE_PIXELS and twice that, and raises beyond; har_ref
# refuses from MAX_IMAGE_PIXELS on (check_pixel_count), so the warning would only be noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def check_pixel_count(image: Image.Image) -> None:
    """Refuse a decompression bomb (a small file that decodes to gigabytes) before decoding it."""
    if image.width * image.height > Image.MAX_IMAGE_PIXELS:
        raise Image.DecompressionBombError(
            f"{image.width}x{image.height} = {image.width * image.height} pixels is beyond Pillow's "
            f"decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels")


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale (e.g. a 16-bit PNG) -> 8-bit "L" by v / 257 (65535 -> 255). Pillow's own
    convert("RGB") clips at 255 instead, turning almost every 16-bit photo white."""
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    values = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.rint(values / 257).clip(0, 255).astype(np.uint8), mode="L")


def load_image(path: str | Path) -> Image.Image:
    """Open an image file upright (EXIF orientation applied), 16-bit scaled to 8, and in RGB."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image {path} does not exist; check the path or the dataset folder.")
    try:
        with Image.open(path) as image:
            check_pixel_count(image)
            image.load()  # decode now, so a truncated file fails here and not in a worker later
            image = to_8bit(ImageOps.exif_transpose(image))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"Image {path} cannot be read ({error}); remove or replace the file.") from error
    return to_rgb(image)


def resize_geometry(width: int, height: int, cfg: ModelConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized width, height), (left, top) of the S x S crop in the resized image) of the eval transform;
    (0, 0) without a crop, where the resize gives S x S itself (ModelConfig checks that)."""
    n = cfg.resized_to
    if cfg.resize == "none":
        new_size = (width, height)
    elif cfg.resize == "square":
        new_size = (n, n)
    elif width <= height:  # transformers' get_resize_output_image_size (= torchvision Resize(int)): long side floored
        new_size = (n, int(n * height / width))
    else:
        new_size = (int(n * width / height), n)
    if not cfg.center_crop:
        return new_size, (0, 0)
    # transformers' center_crop: floor((resized - S) / 2); negative where the image is smaller than S, and
    # then PIL's crop fills the outside with 0, where transformers pads with zeros before it crops.
    size = cfg.vision.image_size
    return new_size, ((new_size[0] - size) // 2, (new_size[1] - size) // 2)


def _resize_and_crop(image: Image.Image, cfg: ModelConfig) -> Image.Image:
    size = cfg.vision.image_size
    new_size, (left, top) = resize_geometry(*image.size, cfg)
    if cfg.resize != "none":
        image = image.resize(new_size, Image.Resampling(cfg.resample))
    return image.crop((left, top, left + size, top + size)) if cfg.center_crop else image


def transform_name(cfg: ModelConfig) -> str:
    """Everything the uint8 eval transform depends on, as a file name: 'shortest_edge_224_crop_224_bicubic',
    'square_224_bicubic' (the image cache, data/image_cache.py, keeps one pixel file per name)."""
    resize = "none" if cfg.resize == "none" else f"{cfg.resize}_{cfg.resized_to}"
    crop = f"_crop_{cfg.vision.image_size}" if cfg.center_crop else ""
    return f"{resize}{crop}_{Image.Resampling(cfg.resample).name.lower()}"


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, H, W]."""
    # numpy makes the channels-first copy: torch would hand this small copy to its thread pool.
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)))


def to_uint8_resized(image: Image.Image, cfg: ModelConfig) -> torch.Tensor:
    """The eval transform up to, not including, normalisation: uint8 [3, S, S]."""
    return pil_to_uint8(_resize_and_crop(to_rgb(image), cfg))


def normalize_uint8(pixels: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 (x / 255 - mean) / std, on the tensor's device."""
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    # float32 x / 255 equals transformers' float64 x * (1/255) cast to float32 for all 256 values.
    return (pixels.to(torch.float32) / 255 - mean) / std


def _eval_transform(image: Image.Image, cfg: ModelConfig) -> torch.Tensor:
    return normalize_uint8(to_uint8_resized(image, cfg), cfg)


def _augmented_transform(image: Image.Image, cfg: ModelConfig, augment: Callable) -> torch.Tensor:
    return normalize_uint8(pil_to_uint8(augment(to_rgb(image))), cfg)


def build_transform(cfg: ModelConfig, train: bool = False,
                    augment: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> float32 [3, S, S]. Random augmentation only when both `train` and `augment`;
    otherwise the deterministic eval transform. Draws from torch's global RNG (seed it to repeat)."""
    if not (train and augment):
        return functools.partial(_eval_transform, cfg=cfg)
    # Image.Resampling and torchvision's InterpolationMode name the PIL filters alike (BICUBIC, BILINEAR, ...).
    interpolation = T.InterpolationMode[Image.Resampling(cfg.resample).name]
    crop_and_flip = T.Compose([
        T.RandomResizedCrop(cfg.vision.image_size, scale=(0.6, 1.0), interpolation=interpolation),
        T.RandomHorizontalFlip(),
    ])
    return functools.partial(_augmented_transform, cfg=cfg, augment=crop_and_flip)
