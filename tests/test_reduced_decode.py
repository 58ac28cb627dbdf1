"""JPEG decode at reduced size (DCT scaling) keeps the crop geometry of the full decode."""

from __future__ import annotations

import io
import random
import time

import numpy as np
import pytest
import torch
from PIL import Image

from distrain.data.decode import (
    DecodeError,
    _pixels,
    center_crop_box,
    crop_resize,
    dct_factor,
    eval_sample,
    image_size,
    random_resized_crop_box,
    snap_box,
)


def photo_like(width: int, height: int, seed: int, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """A smooth image with structure at several scales (what DCT scaling is designed for)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(2 * np.pi * (f1 * x + f2 * y) + p) for f1, f2, p in rng.uniform(0.5, 4, (3, 3))]
    img = ((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).convert(mode).save(buf, fmt, quality=90)
    return buf.getvalue()


def shift_of(a: np.ndarray, b: np.ndarray, span: int = 3) -> tuple[int, int]:
    """The whole-pixel shift of ``b`` against ``a`` that matches them best (0, 0 = aligned)."""
    n = a.shape[0]
    errors = {(dy, dx): np.abs(a[span + dy:n - span + dy, span + dx:n - span + dx] - b[span:n - span, span:n - span]).mean()
              for dy in range(-span, span + 1) for dx in range(-span, span + 1)}
    return min(errors, key=errors.get)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_reduced_decode_gives_the_same_crop(size):
    reduced_any = False
    for seed in range(6):
        data = photo_like(480 + 17 * seed, 360 + 11 * seed, seed)
        w, h = image_size(data)
        for box in (random_resized_crop_box(w, h, (0.25, 1.0), (3 / 4, 4 / 3), random.Random(seed)),
                    center_crop_box(w, h, size * 8 // 7, size)):
            factor = dct_factor(box, size)
            snapped = snap_box(box, factor)
            assert max(abs(a - b) for a, b in zip(box, snapped)) <= factor / 2
            full = crop_resize(data, snapped, size, reduce=False).permute(1, 2, 0).float().numpy()
            reduced = crop_resize(data, box, size).permute(1, 2, 0).float().numpy()
            assert reduced.shape == full.shape == (size, size, 3)
            reduced_any |= factor > 1
            # Same region: no pixel shift, and a mean error of a grey level or two (DCT scaling
            # smooths differently from an antialiased resize).
            assert shift_of(full, reduced) == (0, 0)
            assert np.abs(reduced - full).mean() < 2.0, (box, factor)
    assert reduced_any


def test_dct_factor_is_the_smallest_scale_that_covers_the_target():
    data = photo_like(500, 375, 0)
    box = (0, 0, 500, 375)
    for size, factor, shape in ((64, 4, (94, 125)), (32, 8, (47, 63)), (150, 2, (188, 250)), (400, 1, (375, 500))):
        assert dct_factor(box, size) == factor, size
        pixels, used = _pixels(data, factor)
        assert used == factor and pixels.shape == (*shape, 3)  # libjpeg rounds the sides up


def test_matches_a_full_pil_decode_and_resize():
    """The torch resize of the decoded crop matches PIL's antialiased resize of the same box."""
    data = photo_like(400, 300, 3)
    box = (37, 21, 337, 281)
    ours = crop_resize(data, box, 96, reduce=False).permute(1, 2, 0).float().numpy()
    pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((96, 96), Image.BILINEAR, box=box), np.float32)
    assert np.abs(ours - pil).mean() < 1.5


@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG")])
def test_other_jpeg_kinds_and_formats_decode_to_rgb(mode, fmt):
    data = photo_like(120, 90, 1, mode, fmt)
    assert image_size(data) == (120, 90)
    out = eval_sample(data, 40, 32)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    if mode == "L":
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_corrupt_image_raises():
    data = photo_like(120, 90, 1)
    with pytest.raises(DecodeError) as caught:  # bad data, which the stream counts, not a crash
        eval_sample(data[:200], 40, 32)
    assert isinstance(caught.value.__cause__, OSError)  # PIL's truncated-file error, after libjpeg-turbo refused


def test_reduced_and_full_decode_agree_at_low_resolution():
    """The reduced decode that the loader takes at 64 px gives the full decode's crop (within 2 grey
    levels on average); its speed ratio is printed (-s) for the notes, never asserted: timings are
    noisy. `distrain bench loader` measures the speed side by side."""
    data = [photo_like(500, 375, s) for s in range(8)]
    box = (0, 0, 500, 375)
    for d in data:
        reduced, full = crop_resize(d, box, 64, reduce=True), crop_resize(d, box, 64, reduce=False)
        assert reduced.shape == full.shape == (3, 64, 64)
        assert (reduced.float() - full.float()).abs().mean() < 2.0

    def rate(reduce: bool) -> float:
        start = time.perf_counter()
        for d in data * 3:
            crop_resize(d, box, 64, reduce=reduce)
        return len(data) * 3 / (time.perf_counter() - start)

    ratio = max(rate(True) for _ in range(2)) / max(rate(False) for _ in range(2))
    print(f"reduced vs full decode at 64 px: {ratio:.2f}x")
