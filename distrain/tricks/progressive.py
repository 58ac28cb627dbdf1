"""Progressive resizing: train at low resolution early and at full resolution at the end.

Howard 2018 (fast.ai DAWNBench) and FFCV's ResNet recipes: the resolution ramps linearly from
``start_size`` at ``start_epoch`` to ``end_size`` at ``end_epoch`` and stays there for the final
epochs. Low resolutions are cheaper to compute and, through the decoder's reduced JPEG decode, to
load. The batch composition and the LR schedule do not change with the resolution.
"""

from __future__ import annotations

from distrain.config import Config


def size_at(epoch: int, start_size: int, end_size: int, start_epoch: int, end_epoch: int, step: int) -> int:
    """Training resolution for ``epoch`` (0-based): ``start_size`` up to ``start_epoch``, ``end_size`` from
    ``end_epoch`` on, linear in between rounded to a multiple of ``step``."""
    if epoch <= start_epoch:
        return start_size
    if epoch >= end_epoch:
        return end_size
    t = (epoch - start_epoch) / (end_epoch - start_epoch)
    return max(step, round((start_size + t * (end_size - start_size)) / step) * step)


def train_size(cfg: Config, epoch: int) -> int:
    """The training resolution of ``cfg`` at ``epoch``: ``data.train_crop`` unless progressive resizing is on."""
    p = cfg.progressive
    if not p.start_size:
        return cfg.data.train_crop
    return size_at(epoch, p.start_size, p.end_size or cfg.data.train_crop, p.start_epoch, p.end_epoch, p.step)
