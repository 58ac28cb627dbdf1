"""Inference-resize tuning: choose the eval resize on one half of the validation set, report on the other.

torchvision's recipe found that a model trained at crop 176 is best evaluated at resize 232 /
crop 224 rather than the classic 256 / 224 (Vryniotis 2021). Picking that resize on the whole
validation set and reporting the accuracy on the same set overstates it, so the samples are split
in two halves by a hash of their key (independent of shard order and world size): the resize is
chosen on half A and its accuracy reported on half B.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass


def half_of(key: str) -> int:
    """0 (half A, where the resize is picked) or 1 (half B, where it is reported) for a sample key."""
    return zlib.crc32(key.encode()) & 1


def default_resizes(crop: int, configured: int) -> list[int]:
    """Candidate resizes for ``crop``: ratios from 1 (no border) to 1.28, plus the configured one."""
    return sorted({configured, *(round(crop * r) for r in (1.0, 1.04, 1.08, 1.14, 1.2, 1.28))})


@dataclass(frozen=True)
class SweepResult:
    """Top-1 (percent) per resize on each half, the resize picked on half A, and the samples per half."""

    top1_a: dict[int, float]
    top1_b: dict[int, float]
    picked: int
    samples: tuple[int, int]


def pick_resize(hits: dict[int, dict[str, bool]]) -> SweepResult:
    """Choose the resize with the best top-1 on half A (the smaller resize among equals).

    Args:
        hits: For each resize, whether each sample (by key) was classified right.

    Raises:
        ValueError: a half holds no sample.
    """
    top1 = ({}, {})
    counts = (0, 0)
    for resize, by_key in hits.items():
        right, total = [0, 0], [0, 0]
        for key, hit in by_key.items():
            h = half_of(key)
            total[h] += 1
            right[h] += hit
        if not all(total):
            raise ValueError("the eval set is too small to split in two halves")
        for h in (0, 1):
            top1[h][resize] = 100 * right[h] / total[h]
        counts = (total[0], total[1])
    picked = max(sorted(top1[0]), key=lambda r: top1[0][r])
    return SweepResult(top1[0], top1[1], picked, counts)
