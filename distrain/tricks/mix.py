"""MixUp and CutMix on the device, with soft targets, and the cross-entropy that trains on them.

Per batch, :class:`MixCut` applies torchvision's ``v2.MixUp`` or ``v2.CutMix`` with probability
``prob`` and otherwise returns one-hot targets, so the loss is always :func:`soft_cross_entropy`.
torchvision pairs each image with the previous one in the batch (``roll(1, 0)``; the stream's
batches are already shuffled) and keeps ``lam`` of the image's own target.

Determinism: the choices and torchvision's ``lam`` and box come from torch's global CPU
generator, which the training process alone draws from (the stream seeds and restores it around
its own draws even with workers=0). Accelerate saves that generator's state per rank in each
checkpoint and restores it on resume, so a resumed run mixes exactly as the uninterrupted one.
All draws happen on the host and never wait for the device.

Label -1 (a training batch the stream could not fill, see ``distrain.data.stream``): its target
row is all zeros, so it contributes nothing to :func:`soft_cross_entropy`. torchvision is given
these soft targets rather than the int labels (which it would one-hot, failing on -1), and the
label -1 rows are zeroed again after mixing. A real row paired with a label -1 row thus keeps
only its own share ``lam`` of target mass; the stream only makes whole batches of label -1, so
this never happens in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2


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


class MixCut:
    """MixUp or CutMix applied to a whole batch with probability ``prob``; soft targets always.

    Args:
        num_classes: Number of classes (width of the targets).
        mixup_alpha: Beta(alpha, alpha) parameter of MixUp; 0 disables MixUp.
        cutmix_alpha: Beta(alpha, alpha) parameter of CutMix; 0 disables CutMix.
        prob: Probability that a batch is mixed at all.
        switch_prob: Probability of CutMix rather than MixUp when both are enabled.
        label_smoothing: Label smoothing of :meth:`loss`.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float,
        cutmix_alpha: float,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
    ):
        self.num_classes, self.prob, self.switch_prob = num_classes, prob, switch_prob
        self.label_smoothing = label_smoothing
        self.mixup = v2.MixUp(alpha=mixup_alpha, num_classes=num_classes) if mixup_alpha > 0 else None
        self.cutmix = v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes) if cutmix_alpha > 0 else None

    @property
    def enabled(self) -> bool:
        """Whether MixUp or CutMix can happen at all (False when both alphas are 0)."""
        return self.mixup is not None or self.cutmix is not None

    def _choose(self) -> v2.Transform | None:
        """The transform for this batch, or None; draws nothing when mixing is disabled."""
        if not self.enabled or torch.rand(()).item() >= self.prob:
            return None
        if self.mixup is None:
            return self.cutmix
        if self.cutmix is None:
            return self.mixup
        return self.cutmix if torch.rand(()).item() < self.switch_prob else self.mixup

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix a batch.

        Args:
            images: Normalised float batch (B, C, H, W), on any device.
            labels: int64 (B,) labels in ``[0, num_classes)`` or -1, on the same device.

        Returns:
            (images, float32 targets (B, num_classes)): rows sum to 1, label -1 rows are all zeros.
        """
        keep = (labels >= 0).unsqueeze(1)
        targets = F.one_hot(labels.clamp_min(0), self.num_classes).float() * keep
        mix = self._choose()
        if mix is None:
            return images, targets
        images, targets = mix(images, targets)
        return images, targets * keep

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """:func:`soft_cross_entropy` with this instance's label smoothing."""
        return soft_cross_entropy(logits, targets, self.label_smoothing)
