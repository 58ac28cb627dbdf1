"""Colour augmentations of the views of self-supervised pretraining (SimCLR, BYOL) on uint8 CHW tensors.

Each view of a sample is cropped and flipped as any training sample (:func:`distrain.data.decode.train_sample`)
and then goes through :func:`ssl_view`: colour jitter, random grayscale, Gaussian blur and solarisation,
in SimCLR's order (Chen et al. 2020, appendix A; solarisation from BYOL, Grill et al. 2020). Every
random draw comes from the ``random.Random`` the stream makes per batch, never from torch's or
numpy's global generators, so that a batch's views are a function of its batch seed alone and a
resumed stream repeats them exactly.

Settings of the papers (``strength`` s scales the jitter: brightness, contrast and saturation
``0.8 s``, hue ``0.2 s``):

- SimCLR, ImageNet: s 1.0, jitter 0.8, grayscale 0.2, blur (0.5, 0.5), no solarisation;
- SimCLR, CIFAR: s 0.5, no blur;
- BYOL: blur (1.0, 0.1), solarisation (0.0, 0.2).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as TF

from distrain.errors import DistrainError

SIGMA = (0.1, 2.0)
"""Range of the Gaussian blur's sigma, in output pixels."""
BLUR_FRACTION = 0.1
"""The blur kernel's side as a fraction of the image side (rounded down to an odd size)."""
SOLARIZE_THRESHOLD = 128
"""Pixels at or above it are inverted by solarisation."""


@dataclass(frozen=True)
class ViewAugment:
    """Colour augmentation settings of the views.

    ``blur_p`` and ``solarize_p`` hold one probability per view; view ``i`` uses entry
    ``i mod len``, so a single entry applies to every view.

    Attributes:
        strength: SimCLR's colour jitter strength s (1.0 ImageNet, 0.5 CIFAR); at most 2.5, where
            the hue shift ``0.2 s`` reaches half the colour wheel.
        jitter_p: Probability of the colour jitter.
        grayscale_p: Probability of converting to grayscale (three equal channels).
        blur_p: Per view, probability of the Gaussian blur.
        solarize_p: Per view, probability of solarisation.
    """

    strength: float = 1.0
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: tuple[float, ...] = (0.5, 0.5)
    solarize_p: tuple[float, ...] = (0.0, 0.0)

    def __post_init__(self):
        if not 0 <= self.strength <= 2.5:
            raise DistrainError(f"view colour jitter strength {self.strength} is outside [0, 2.5]")
        for name in ("blur_p", "solarize_p"):
            if not getattr(self, name):
                raise DistrainError(f"view {name} is empty; give one probability per view")
        for name in ("jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            values = getattr(self, name)
            if any(not 0 <= p <= 1 for p in (values if isinstance(values, tuple) else (values,))):
                raise DistrainError(f"view {name} {values} holds a probability outside [0, 1]")


def color_jitter(img: torch.Tensor, rng: random.Random, strength: float) -> torch.Tensor:
    """Brightness, contrast, saturation (factors in ``[1 - 0.8 s, 1 + 0.8 s]``) and hue (shift in
    ``[-0.2 s, 0.2 s]``), in a random order, as torchvision's ``ColorJitter`` draws them."""
    b = 0.8 * strength
    order = rng.sample(range(4), 4)
    factors = [rng.uniform(max(0.0, 1 - b), 1 + b) for _ in range(3)] + [rng.uniform(-0.2 * strength, 0.2 * strength)]
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in order:
        img = ops[i](img, factors[i])
    return img


def gaussian_blur(img: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """SimCLR's blur: kernel about 10% of the image side, sigma uniform in :data:`SIGMA`."""
    side = max(img.shape[-2:])
    kernel = int(BLUR_FRACTION * side) // 2 * 2 + 1
    sigma = rng.uniform(*SIGMA)
    return TF.gaussian_blur(img, [kernel, kernel], [sigma, sigma])


def ssl_view(img: torch.Tensor, rng: random.Random, augment: ViewAugment, view_index: int) -> torch.Tensor:
    """The colour augmentation of view ``view_index`` of a cropped and flipped sample.

    Args:
        img: uint8 (3, H, W).
        rng: The batch's generator; the only source of randomness.
        augment: The settings.
        view_index: Which view this is (selects ``blur_p`` and ``solarize_p``).

    Returns:
        uint8 (3, H, W).
    """
    a = augment
    if rng.random() < a.jitter_p:
        img = color_jitter(img, rng, a.strength)
    if rng.random() < a.grayscale_p:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if rng.random() < a.blur_p[view_index % len(a.blur_p)]:
        img = gaussian_blur(img, rng)
    if rng.random() < a.solarize_p[view_index % len(a.solarize_p)]:
        img = TF.solarize(img, SOLARIZE_THRESHOLD)
    return img
