"""Per-sample decode and crop: encoded bytes -> uint8 CHW tensor at the target resolution.

The crop is chosen from the image size in the file header, before any pixel is decoded, so a JPEG
can be decoded at a reduced size (libjpeg-turbo's DCT scaling, through simplejpeg) whenever the
crop still has at least the target resolution; the crop is then a view of the decoded pixels and
the resize one antialiased torch call on uint8. Crop and flip draw
from an explicit ``random.Random``; a policy augmentation (torchvision's TrivialAugmentWide,
RandAugment or AutoAugment) draws from torch's global generator, which the caller seeds per batch,
so a sample's augmentation is a function of its batch seed alone.
"""

from __future__ import annotations

import io
import math
import random
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from distrain.errors import DistrainError

Box = tuple[float, float, float, float]
POLICIES = ("none", "trivialaugment", "randaugment", "autoaugment")
JPEG_MAGIC = b"\xff\xd8"


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Sample member extensions that hold an image: what the stream reads and the writer writes."""


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


class DecodeError(Exception):
    """Image bytes that do not decode (corrupt, truncated, not an image, a decompression bomb).

    Raised by the decode step alone, so that a caller tells bad data from an error of the crop or
    augmentation that follows; the message is the decoder's, which is chained.
    """


# What PIL and simplejpeg raise for bytes they cannot decode; OSError covers PIL's
# UnidentifiedImageError and "image file is truncated" (the bytes are in memory: no file I/O).
_DECODER_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


@contextmanager
def _decoding() -> Iterator[None]:
    try:
        yield
    except _DECODER_ERRORS as exc:
        raise DecodeError((str(exc).splitlines() or [type(exc).__name__])[0]) from exc


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of encoded image bytes, from the header alone.

    Raises:
        DecodeError: the header does not decode.
    """
    if data[:2] == JPEG_MAGIC:
        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            return w, h
        except ValueError:
            pass  # libjpeg-turbo refuses some headers that PIL reads
    with _decoding(), Image.open(io.BytesIO(data)) as img:
        return img.size


def dct_factor(box: Box, size: int) -> int:
    """The largest JPEG DCT reduction (1, 2, 4 or 8) at which ``box`` still spans ``size`` pixels.

    libjpeg-turbo also scales by 7/8, 6/8, ...; those take its plain-C paths and decode slower
    than the full size (measured), so only the SIMD power-of-two scales are used.
    """
    side = min(box[2] - box[0], box[3] - box[1])
    factor = 1
    while factor < 8 and side >= 2 * factor * size:
        factor *= 2
    return factor


def _pixels(data: bytes, factor: int) -> tuple[np.ndarray, int]:
    """RGB uint8 (H, W, 3) pixels of ``data`` and the reduction they were decoded at.

    A JPEG is decoded at 1/``factor`` size (libjpeg-turbo rounds the sides up); images it cannot
    decode (PNG, WebP, rare JPEG variants) take PIL's full-size decode, which raises
    :class:`DecodeError` for a corrupt file.
    """
    if data[:2] == JPEG_MAGIC:
        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            pixels = simplejpeg.decode_jpeg(data, "RGB", min_width=-(-w // factor), min_height=-(-h // factor))
            return pixels, factor
        except ValueError:
            pass
    with _decoding(), Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert("RGB")), 1


def crop_resize(data: bytes, box: Box, size: int, reduce: bool = True) -> torch.Tensor:
    """Decode ``data`` reduced where possible, crop ``box`` and resize it to a uint8 (3, size, size).

    The JPEG is decoded at the DCT reduction ``k`` that :func:`dct_factor` allows and the box is
    snapped to whole decoded pixels, that is to multiples of ``k`` source pixels: each edge moves
    by at most ``k / 2`` source pixels, under a quarter of an output pixel since the box spans at
    least ``2 k size`` of them. A full-size decode of the snapped box (:func:`snap_box`) covers
    exactly the same region. The crop is copied once, into the channels-last layout that torch's
    vectorised antialiased bilinear resize on uint8 reads; that resize matches PIL's to about a
    grey level. ``reduce=False`` decodes at full size: the reference the reduced decode is tested
    against.
    """
    pixels, factor = _pixels(data, dct_factor(box, size) if reduce else 1)
    h, w = pixels.shape[:2]
    x0, y0, x1, y1 = (round(c / factor) for c in box)
    x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
    x1, y1 = max(min(x1, w), x0 + 1), max(min(y1, h), y0 + 1)
    crop = torch.from_numpy(np.ascontiguousarray(pixels[y0:y1, x0:x1])).permute(2, 0, 1).unsqueeze(0)
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def pad_crop_offsets(width: int, height: int, size: int, pad: int, rng: random.Random) -> tuple[int, int]:
    """(left, top) of a random ``size`` x ``size`` window of the image padded by ``pad`` on every side.

    The offsets are in padded coordinates (0 is the outer edge of the padding), each uniform over
    every position where the window fits, as torchvision's ``RandomCrop(size, padding=pad)`` draws them.
    """
    return rng.randint(0, width + 2 * pad - size), rng.randint(0, height + 2 * pad - size)


def _padded_index(start: int, size: int, n: int, pad_fill: str) -> tuple[np.ndarray, np.ndarray]:
    """Source indices of ``size`` padded positions from ``start`` (in unpadded coordinates, so the
    padding is at < 0 and >= ``n``), and the mask of positions that fall in a zero fill."""
    i = np.arange(start, start + size)
    outside = (i < 0) | (i >= n)
    if pad_fill == "reflect":  # numpy's and torch's "reflect": the edge pixel is not repeated
        i = np.abs(i)
        i = np.where(i >= n, 2 * (n - 1) - i, i)
        return i, np.zeros_like(outside)
    return np.clip(i, 0, n - 1), outside


def pad_crop(pixels: np.ndarray, left: int, top: int, size: int, pad: int, pad_fill: str) -> torch.Tensor:
    """The ``size`` x ``size`` window at (``left``, ``top``) of RGB ``pixels`` (H, W, 3) padded by ``pad``.

    Equals ``torchvision.transforms.v2.functional.crop(pad(image, pad, padding_mode=...), top, left,
    size, size)``, without building the padded image: rows and columns are gathered by index, which
    also works on uint8, where torch's reflection padding does not. ``pad_fill`` is ``zero`` (black)
    or ``reflect`` (mirrored about the edge pixel, which needs ``pad`` < the image side).

    Returns:
        A uint8 tensor (3, size, size).
    """
    h, w = pixels.shape[:2]
    rows, row_fill = _padded_index(top - pad, size, h, pad_fill)
    cols, col_fill = _padded_index(left - pad, size, w, pad_fill)
    out = pixels[np.ix_(rows, cols)]
    out[row_fill] = 0
    out[:, col_fill] = 0
    return torch.from_numpy(out).permute(2, 0, 1)


def short_side_pixels(data: bytes, size: int) -> np.ndarray:
    """RGB uint8 (H, W, 3) pixels of ``data`` with the shorter side resized to ``size``.

    Images already at that size (CIFAR at 32 px) are returned as decoded; others are decoded at the
    largest JPEG reduction that keeps the shorter side at ``2 size`` or more and resized like
    :func:`crop_resize`.
    """
    width, height = image_size(data)
    pixels, _ = _pixels(data, dct_factor((0, 0, width, height), size))
    h, w = pixels.shape[:2]
    if min(h, w) == size:
        return pixels
    s = size / min(h, w)
    image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).unsqueeze(0)
    out = F.interpolate(image, size=(max(size, round(h * s)), max(size, round(w * s))), mode="bilinear",
                        antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def snap_box(box: Box, factor: int) -> Box:
    """``box`` with its edges on the grid of whole pixels of a 1/``factor`` decode, in source pixels."""
    return tuple(round(c / factor) * factor for c in box)


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
    crop: str = "rrc",
    pad: int = 4,
    pad_fill: str = "zero",
) -> torch.Tensor:
    """Random crop + optional horizontal flip + optional policy -> uint8 tensor (3, size, size).

    ``crop`` ``rrc`` is RandomResizedCrop (``scale``, ``ratio``); ``pad`` is the CIFAR crop of He
    et al. 2016: the shorter side resized to ``size`` (a no-op for CIFAR at 32 px), ``pad`` pixels
    of ``pad_fill`` (``zero`` or ``reflect``) added on every side, and a random ``size`` x ``size``
    window kept (:func:`pad_crop`). Both draw their offsets from ``rng``.
    ``policy`` (from :func:`make_policy`) runs on the uint8 tensor and draws from torch's global
    generator rather than ``rng``. ``resize > 0`` replaces the random
    crop by the test-time one (shorter side to ``resize``, centre crop ``size``): FixRes training.
    """
    if crop == "pad" and not resize:
        pixels = short_side_pixels(data, size)
        left, top = pad_crop_offsets(pixels.shape[1], pixels.shape[0], size, pad, rng)
        out = pad_crop(pixels, left, top, size, pad, pad_fill)
    else:
        width, height = image_size(data)
        box = center_crop_box(width, height, resize, size) if resize else random_resized_crop_box(
            width, height, scale, ratio, rng)
        out = crop_resize(data, box, size)
    if hflip and rng.random() < 0.5:
        out = out.flip(-1)
    if policy is not None:
        out = policy(out)
    return out


def eval_sample(data: bytes, resize: int, crop: int) -> torch.Tensor:
    """Resize (shorter side) + centre crop -> uint8 tensor (3, crop, crop)."""
    return crop_resize(data, center_crop_box(*image_size(data), resize, crop), crop)
