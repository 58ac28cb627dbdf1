"""Per-sample decode and crop: encoded bytes -> uint8 CHW tensor at the target resolution.

The crop is chosen from the image size in the file header, before any pixel is decoded, so a JPEG
can be decoded at a reduced size (libjpeg's DCT scaling via PIL ``draft``) whenever the crop still
has at least the target resolution; crop and resize are then one PIL call. Crop and flip draw
from an explicit ``random.Random``; a policy augmentation (torchvision's TrivialAugmentWide,
RandAugment or AutoAugment) draws from torch's global generator, which the caller seeds per batch,
so a sample's augmentation is a function of its batch seed alone.
"""

from __future__ import annotations

import io
import math
import random

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from distrain.errors import DistrainError

Box = tuple[float, float, float, float]
POLICIES = ("none", "trivialaugment", "randaugment", "autoaugment")


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> Box:
    """A RandomResizedCrop box (left, top, right, bottom) with torchvision's sampling rule.

    Ten tries at a random area fraction in ``scale`` and log-uniform aspect ratio in ``ratio``;
    otherwise the largest centred box whose ratio is clamped into ``ratio``.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return (left, top, left + w, top + h)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return (left, top, left + w, top + h)


def center_crop_box(width: int, height: int, resize: int, crop: int) -> Box:
    """The box that Resize(resize) (shorter side) followed by CenterCrop(crop) keeps, in source pixels."""
    s = min(width, height) / resize
    side_w, side_h = min(crop * s, width), min(crop * s, height)
    left, top = (width - side_w) / 2, (height - side_h) / 2
    return (left, top, left + side_w, top + side_h)


def crop_resize(img: Image.Image, box: Box, size: int, reduce: bool = True) -> Image.Image:
    """Decode ``img`` (opened, not yet loaded) reduced where possible, then crop ``box`` to size x size.

    ``draft`` asks libjpeg for the smallest DCT scale (1/2, 1/4, 1/8) at which the box still
    covers at least ``size`` pixels on both sides; the box is mapped to the reduced image.
    ``reduce=False`` decodes at full size (the reference the reduced decode is tested against).
    """
    width, height = img.size
    bw, bh = box[2] - box[0], box[3] - box[1]
    if reduce and img.format == "JPEG":
        need = max(size / bw, size / bh)
        img.draft("RGB", (math.ceil(width * need), math.ceil(height * need)))
    # libjpeg scales by exactly 1/2^k, rounding the size up: map the box by 1/2^k, not by the ratio
    # of the (rounded) sizes, or crops of widths that are not multiples of 2^k shift and stretch.
    factor = 1.0 / 2 ** round(math.log2(width / img.size[0]))
    img = img.convert("RGB")
    scaled = tuple(c * factor for c in box)
    return img.resize((size, size), Image.BILINEAR, box=scaled)


def open_image(data: bytes) -> Image.Image:
    """Open encoded image bytes lazily (header only)."""
    return Image.open(io.BytesIO(data))


def make_policy(name: str, ops: int, magnitude: int) -> v2.Transform | None:
    """The torchvision policy augmentation called ``name`` (bilinear), or None for "none".

    Args:
        name: One of :data:`POLICIES`.
        ops: RandAugment's number of ops per image (ignored by the other policies).
        magnitude: RandAugment's magnitude (ignored by the other policies).

    Raises:
        DistrainError: ``name`` is not one of :data:`POLICIES`.
    """
    bilinear = v2.InterpolationMode.BILINEAR
    if name == "none":
        return None
    if name == "trivialaugment":
        return v2.TrivialAugmentWide(interpolation=bilinear)
    if name == "randaugment":
        return v2.RandAugment(num_ops=ops, magnitude=magnitude, interpolation=bilinear)
    if name == "autoaugment":
        return v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=bilinear)
    raise DistrainError(f"unknown augmentation policy {name!r}; expected one of {', '.join(POLICIES)}")


def train_sample(
    data: bytes,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip: bool,
    rng: random.Random,
    policy: v2.Transform | None = None,
    resize: int = 0,
) -> torch.Tensor:
    """RandomResizedCrop + optional horizontal flip + optional policy -> uint8 tensor (3, size, size).

    ``policy`` (from :func:`make_policy`) runs on the PIL image, where its ops are cheapest, and
    draws from torch's global generator rather than ``rng``. ``resize > 0`` replaces the random
    crop by the test-time one (shorter side to ``resize``, centre crop ``size``): FixRes training.
    """
    img = open_image(data)
    box = center_crop_box(*img.size, resize, size) if resize else random_resized_crop_box(*img.size, scale, ratio, rng)
    out = crop_resize(img, box, size)
    if hflip and rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    if policy is not None:
        out = policy(out)
    return pil_to_tensor(out)


def eval_sample(data: bytes, resize: int, crop: int) -> torch.Tensor:
    """Resize (shorter side) + centre crop -> uint8 tensor (3, crop, crop)."""
    img = open_image(data)
    return pil_to_tensor(crop_resize(img, center_crop_box(*img.size, resize, crop), crop))
