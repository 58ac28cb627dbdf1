"""Random erasing on the device, on a normalised batch (Zhong et al., https://arxiv.org/abs/1708.04896).

torchvision's ``v2.RandomErasing`` draws one decision and one box per call from torch's global
generator, so applied to a batch it erases the same box in every image. Here each image gets its
own decision and box, drawn with torchvision's rule from an optional generator, and
torchvision's ``erase`` does the erasing. The parameters are drawn on the host, which never
waits for the device; the erasing is one small kernel per erased image.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms.v2.functional import erase

SCALE = (0.02, 0.33)
"""Range of the erased area as a fraction of the image (torchvision's default)."""
RATIO = (0.3, 3.3)
"""Range of the erased box's aspect ratio, sampled log-uniformly (torchvision's default)."""


def erase_box(height: int, width: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int] | None:
    """A box (top, left, h, w) to erase, drawn as ``v2.RandomErasing.make_params`` does, or None.

    Ten tries at an area fraction in :data:`SCALE` and a log-uniform aspect ratio in :data:`RATIO`
    for a box strictly smaller than the image on both sides; None (nothing erased) when all fail,
    as in torchvision.

    Args:
        height: Image height.
        width: Image width.
        generator: A CPU generator; None draws from torch's global one.
    """
    area = height * width
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(10):
        erase_area = area * torch.empty(1).uniform_(SCALE[0], SCALE[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=generator).item())
        h = int(round(math.sqrt(erase_area * aspect)))
        w = int(round(math.sqrt(erase_area / aspect)))
        if h < height and w < width:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    return None


def erasing_boxes(
    batch: int, height: int, width: int, p: float, generator: torch.Generator | None = None
) -> list[tuple[int, int, int, int] | None]:
    """Each image's erased box (top, left, h, w), or None, drawn in batch order.

    Drawn as torchvision's ``_RandomApplyTransform`` draws it: erase when ``rand < p``, then a box
    by :func:`erase_box`.

    Args:
        batch: Number of images.
        height: Image height.
        width: Image width.
        p: Probability that an image is erased.
        generator: A CPU generator; None draws from torch's global one.
    """
    boxes = []
    for _ in range(batch):
        erased = torch.rand(1, generator=generator).item() < p
        boxes.append(erase_box(height, width, generator) if erased else None)
    return boxes


def apply_erasing(images: torch.Tensor, boxes: list[tuple[int, int, int, int] | None]) -> torch.Tensor:
    """Erase ``boxes[k]`` of image ``k`` to 0 (the dataset mean after normalisation).

    0 is torchvision's default ``value=0`` applied after ``Normalize``.

    Returns:
        A new batch (same memory format); ``images`` is left unchanged.
    """
    out = images.clone()
    zero = torch.zeros((), dtype=images.dtype, device=images.device)
    for k, box in enumerate(boxes):
        if box is not None:
            erase(out[k], *box, v=zero, inplace=True)
    return out


def random_erasing(images: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Erase a random box to 0 in each image of a normalised batch with probability ``p``.

    Args:
        images: Normalised float batch (B, C, H, W), on any device.
        p: Probability that an image is erased.
        generator: A CPU generator for the decisions and boxes (the loop derives one per rank and
            micro-batch, see :mod:`distrain.parallel.rng`); None draws from torch's global one.

    Returns:
        A new batch (same memory format); ``images`` is left unchanged.
    """
    height, width = images.shape[-2:]
    return apply_erasing(images, erasing_boxes(images.shape[0], height, width, p, generator))
