"""JPEG decode at reduced size (DCT scaling) keeps the crop geometry of the full decode."""

from __future__ import annotations

import io
import random
import time

import numpy as np
import pytest
from PIL import Image

from distrain.data.decode import center_crop_box, crop_resize, open_image, random_resized_crop_box


def photo_like(width: int, height: int, seed: int) -> bytes:
    """A smooth JPEG with structure at several scales (what DCT scaling is designed for)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(2 * np.pi * (f1 * x + f2 * y) + p) for f1, f2, p in rng.uniform(0.5, 4, (3, 3))]
    img = ((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("size", [32, 64, 128])
def test_reduced_decode_gives_the_same_crop(size):
    for seed in range(6):
        data = photo_like(480 + 17 * seed, 360 + 11 * seed, seed)
        w, h = open_image(data).size
        for box in (random_resized_crop_box(w, h, (0.25, 1.0), (3 / 4, 4 / 3), random.Random(seed)),
                    center_crop_box(w, h, size * 8 // 7, size)):
            full = np.asarray(crop_resize(open_image(data), box, size, reduce=False), dtype=np.float32)
            reduced_img = open_image(data)
            reduced = np.asarray(crop_resize(reduced_img, box, size), dtype=np.float32)
            assert reduced.shape == full.shape == (size, size, 3)
            assert reduced_img.size != (w, h) or size * 2 > min(box[2] - box[0], box[3] - box[1])
            # Same region: mean error of a few grey levels (DCT scaling smooths differently).
            assert np.abs(reduced - full).mean() < 4.0


def test_draft_picks_the_smallest_dct_scale_that_covers_the_target():
    data = [photo_like(500, 375, s) for s in range(8)]
    box = (0, 0, 500, 375)
    for size, expected in ((64, (125, 94)), (32, (63, 47)), (150, (250, 188)), (400, (500, 375))):
        img = open_image(data[0])
        crop_resize(img, box, size)
        assert img.size == expected, size  # 1/4, 1/8, 1/2 and full scale

    def rate(reduce: bool) -> float:
        start = time.perf_counter()
        for d in data * 3:
            crop_resize(open_image(d), box, 64, reduce=reduce)
        return len(data) * 3 / (time.perf_counter() - start)

    # The speed-up is a figure for the notes (printed with -s), never an assertion: timings are noisy.
    ratio = max(rate(True) for _ in range(2)) / max(rate(False) for _ in range(2))
    print(f"reduced vs full decode at 64 px: {ratio:.2f}x")
