"""Image preprocessing, pixel for pixel as the upstream image processors.

CLIP (cfg.resize == "shortest_edge"; OpenAI's `preprocess`, transformers' CLIPImageProcessorPil):
    resize the shorter side to S with PIL bicubic (the longer side to int(S * long / short)),
    centre crop S x S, x / 255, (x - mean) / std with OpenAI's mean and std.
SigLIP (cfg.resize == "square"; transformers' SiglipImageProcessorPil):
    resize to S x S with PIL bicubic, x / 255, (x - 0.5) / 0.5.
Both first convert to RGB, compositing any transparency onto white as transformers does.

The pipeline is split at the uint8 image, `to_uint8_resized` then `normalize_uint8`, so that a
cache can store uint8 pixels and normalise on the device; the composition *is* the eval transform.

transformers 5's default CLIPImageProcessor / SiglipImageProcessor resize uint8 tensors with
torchvision's antialiased bicubic instead of PIL's; tests/test_transforms.py measures the gap.

Training augmentation (augment=True): RandomResizedCrop(S, scale=(0.6, 1.0)), bicubic, and a
random horizontal flip, then the same normalisation.
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
    """((resized width, height), (left, top) of the S x S crop in the resized image) of the eval transform."""
    size = cfg.vision.image_size
    if cfg.resize == "square":
        return (size, size), (0, 0)
    if cfg.resize != "shortest_edge":
        raise ValueError(f"config.json: resize must be 'shortest_edge' or 'square', got {cfg.resize!r}.")
    # transformers' get_resize_output_image_size (= torchvision Resize(int)): the long side is floored.
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    return new_size, ((new_size[0] - size) // 2, (new_size[1] - size) // 2)


def _resize_and_crop(image: Image.Image, cfg: ModelConfig) -> Image.Image:
    size = cfg.vision.image_size
    new_size, (left, top) = resize_geometry(*image.size, cfg)
    image = image.resize(new_size, Image.Resampling.BICUBIC)
    return image.crop((left, top, left + size, top + size))


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
    crop_and_flip = T.Compose([
        T.RandomResizedCrop(cfg.vision.image_size, scale=(0.6, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
    ])
    return functools.partial(_augmented_transform, cfg=cfg, augment=crop_and_flip)
