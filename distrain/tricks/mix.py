"""MixUp and CutMix on the device, with soft targets, and the cross-entropy that trains on them.

Per batch, :class:`MixCut` applies MixUp (Zhang et al. 2018) or CutMix (Yun et al. 2019) with
probability ``prob`` and otherwise returns one-hot targets, so the loss is always
:func:`soft_cross_entropy`. The image ``i`` is mixed with its *partner* ``i - shift`` (the batch
rolled by ``shift``), and keeps ``lam`` of its own target, as torchvision's ``v2.MixUp``/``v2.CutMix``
do with ``shift`` 1.

Why not torchvision's transforms themselves: they draw from torch's global generator, which every
rank seeds alike (so a 256-GPU global batch would share one lambda and one box), and they always
pair an image with its neighbour, which under in-batch repeated augmentation is usually its own
copy. Here every draw comes from a generator the caller derives per rank and micro-batch
(:mod:`distrain.parallel.rng`), and ``shift`` is the number of copies of a sample the batch holds
(they sit next to each other), so an image is never mixed with one of its own copies.

All draws happen on the host and never wait for the device.

Label -1 (a training batch the stream could not fill, see ``distrain.data.stream``): its target
row is all zeros, so it contributes nothing to :func:`soft_cross_entropy`, and the label -1 rows
are zeroed again after mixing. A real row paired with a label -1 row thus keeps only its own share
``lam`` of target mass; the stream only makes whole batches of label -1, so this never happens in
training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy against probability targets, with label smoothing; all-zero rows count for nothing.

    torch smooths probability targets with the textbook rule ``(1 - eps) * targets + eps / C``,
    which would also give an all-zero (label -1) row mass ``eps``; so each row's loss is scaled by
    its target mass (1, or 0 for label -1) and the mean is taken over the rows with mass, as
    ``CrossEntropyLoss(ignore_index=-1)`` does with int labels. A batch of label -1 rows only has
    loss 0 rather than NaN.

    Args:
        logits: (B, C) scores.
        targets: (B, C) rows summing to 1, or all zeros for rows to ignore.
        label_smoothing: ``eps`` in [0, 1].

    Returns:
        The scalar loss, in float32.
    """
    targets = targets.float()
    per_row = F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing, reduction="none")
    mass = targets.sum(1)
    return (per_row * mass).sum() / (mass > 0).sum().clamp_min(1)


@dataclass(frozen=True)
class MixDraw:
    """What one batch's mixing drew.

    Attributes:
        kind: "mixup" or "cutmix".
        lam: Weight of each image's own target (for CutMix, the area left unpasted).
        box: CutMix only: the pasted box (top, bottom, left, right), bottom/right exclusive.
    """

    kind: str
    lam: float
    box: tuple[int, int, int, int] | None = None


def cutmix_box(lam: float, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """CutMix's box for a drawn ``lam``: sides ``sqrt(1 - lam)`` of the image's, centre uniform, clipped.

    Returns:
        (top, bottom, left, right), bottom/right exclusive; the box may be empty.
    """
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, bottom, left, right


def apply_mix(
    images: torch.Tensor, targets: torch.Tensor, draw: MixDraw, shift: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each image (and its target) with the one ``shift`` places before it in the batch.

    Args:
        images: (B, C, H, W) float batch.
        targets: (B, num_classes) probability targets.
        draw: What to apply (see :class:`MixCut`).
        shift: Partner offset; must be smaller than the batch (0 would mix an image with itself).

    Returns:
        New (images, targets); the inputs are not modified.
    """
    partner_images, partner_targets = images.roll(shift, 0), targets.roll(shift, 0)
    if draw.kind == "mixup":
        mixed = images * draw.lam + partner_images * (1.0 - draw.lam)
    else:
        top, bottom, left, right = draw.box
        mixed = images.clone()
        mixed[:, :, top:bottom, left:right] = partner_images[:, :, top:bottom, left:right]
    return mixed, targets * draw.lam + partner_targets * (1.0 - draw.lam)


class MixCut:
    """MixUp or CutMix applied to a whole batch with probability ``prob``; soft targets always.

    Args:
        num_classes: Number of classes (width of the targets).
        mixup_alpha: Beta(alpha, alpha) parameter of MixUp; 0 disables MixUp.
        cutmix_alpha: Beta(alpha, alpha) parameter of CutMix; 0 disables CutMix.
        prob: Probability that a batch is mixed at all.
        switch_prob: Probability of CutMix rather than MixUp when both are enabled.
        label_smoothing: Label smoothing of :meth:`loss`.
        partner_shift: Each image is mixed with the one this many places before it: the number of
            adjacent copies of a sample in a batch (in-batch repeated augmentation), else 1.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float,
        cutmix_alpha: float,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
        partner_shift: int = 1,
    ):
        if partner_shift < 1:
            raise ValueError(f"partner_shift must be >= 1, got {partner_shift}")
        self.num_classes, self.prob, self.switch_prob = num_classes, prob, switch_prob
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.label_smoothing, self.partner_shift = label_smoothing, partner_shift

    @property
    def enabled(self) -> bool:
        """Whether MixUp or CutMix can happen at all (False when both alphas are 0)."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def draw(self, height: int, width: int, rng: np.random.Generator) -> MixDraw | None:
        """This batch's decision, ``lam`` and box; None (unmixed). Draws nothing when disabled."""
        if not self.enabled or rng.random() >= self.prob:
            return None
        use_cutmix = self.mixup_alpha <= 0 or (self.cutmix_alpha > 0 and rng.random() < self.switch_prob)
        if not use_cutmix:
            return MixDraw("mixup", float(rng.beta(self.mixup_alpha, self.mixup_alpha)))
        box = cutmix_box(float(rng.beta(self.cutmix_alpha, self.cutmix_alpha)), height, width, rng)
        top, bottom, left, right = box
        # The target weight is the area actually kept, after the box was clipped at the border.
        return MixDraw("cutmix", 1.0 - (bottom - top) * (right - left) / (height * width), box)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, MixDraw | None]:
        """Mix a batch.

        Args:
            images: Normalised float batch (B, C, H, W), on any device.
            labels: int64 (B,) labels in ``[0, num_classes)`` or -1, on the same device.
            rng: This rank's generator for this micro-batch (see :mod:`distrain.parallel.rng`).

        Returns:
            (images, float32 targets (B, num_classes), the draw or None): rows sum to 1, label -1
            rows are all zeros.

        Raises:
            ValueError: a mixing batch not larger than ``partner_shift`` (every partner would be a copy).
        """
        keep = (labels >= 0).unsqueeze(1)
        targets = F.one_hot(labels.clamp_min(0), self.num_classes).float() * keep
        if self.enabled and images.shape[0] <= self.partner_shift:
            raise ValueError(f"a batch of {images.shape[0]} cannot be mixed with partners {self.partner_shift} apart")
        draw = self.draw(images.shape[-2], images.shape[-1], rng)
        if draw is None:
            return images, targets, None
        images, targets = apply_mix(images, targets, draw, self.partner_shift)
        return images, targets * keep, draw

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """:func:`soft_cross_entropy` with this instance's label smoothing."""
        return soft_cross_entropy(logits, targets, self.label_smoothing)
