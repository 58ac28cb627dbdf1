"""Distributed evaluation that counts every sample exactly once.

Each rank evaluates its own slice of the eval shards (padded with label -1 to the same number of
batches on every rank), sums loss and hits over real samples only, and one all-reduce adds the
sums. No padding duplicates, so accuracy is identical on 1, 2 or N ranks.

The same all-reduce carries a confusion matrix (true class x predicted top-1), from which come the
per-class metrics: balanced top-1 (the mean of per-class recalls, what a class-imbalanced eval set
needs) and the worst class.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from distrain.data.device import ToDevice, prefetch_to_device
from distrain.data.stream import PAD_LABEL
from distrain.tricks.distill import agreement_hits


class EvalMetrics(dict):
    """Eval metrics: a plain ``{name: value}`` dict to every caller that logs them, with the confusion
    matrix alongside.

    The matrix stays out of the dict so that ``metrics.jsonl`` and W&B get a few numbers per eval
    whatever the number of classes. A copy of the dict (``{**metrics}``, ``dataclasses.asdict``)
    drops it.

    Attributes:
        confusion: int64 counts on the CPU, ``confusion[true class, predicted top-1 class]``, summed
            over ranks: every real eval sample once. None on a copy.
    """

    confusion: torch.Tensor | None = None


def batch_sums(logits: torch.Tensor, labels: torch.Tensor, confusion: torch.Tensor | None = None) -> torch.Tensor:
    """[loss sum, top-1 hits, top-5 hits, count] over the samples whose label is >= 0.

    Masks rather than selects the padding rows: a boolean selection would wait for the device on
    every batch.

    Args:
        confusion: Flat float32 counts of ``C * C + 1`` cells: each real sample adds 1 to cell
            ``label * C + top-1`` (padding rows to the last cell, which is not part of the matrix).
    """
    real = labels >= 0
    logits = logits.float()
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    hits = topk == labels[:, None]  # a padding label (-1) is no class index: never a hit
    if confusion is not None:
        cells = torch.where(real, labels * logits.shape[1] + topk[:, 0], confusion.numel() - 1)
        confusion.index_put_((cells,), torch.ones_like(cells, dtype=confusion.dtype), accumulate=True)
    return torch.stack(
        [
            F.cross_entropy(logits, labels, ignore_index=PAD_LABEL, reduction="sum"),
            hits[:, 0].sum().float(),
            hits.any(dim=1).sum().float(),
            real.sum().float(),
        ]
    )


def class_recalls(confusion: torch.Tensor) -> list[float | None]:
    """Per-class top-1 in percent (the recall of each class) from a confusion matrix.

    Args:
        confusion: ``[true class, predicted class]`` counts.

    Returns:
        One value per class; None for a class with no sample in the eval set.
    """
    counts = confusion.sum(dim=1).tolist()
    return [100 * right / n if n else None for right, n in zip(confusion.diagonal().tolist(), counts)]


def balanced_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """``eval/balanced_top1`` (mean per-class top-1 over the classes present in the eval set),
    ``eval/worst_class_top1`` and ``eval/worst_class`` (its index, the lowest on ties; -1 with no
    sample at all)."""
    present = [(r, c) for c, r in enumerate(class_recalls(confusion)) if r is not None]
    if not present:
        return {"eval/balanced_top1": 0.0, "eval/worst_class_top1": 0.0, "eval/worst_class": -1}
    worst, label = min(present)
    return {"eval/balanced_top1": sum(r for r, _ in present) / len(present), "eval/worst_class_top1": worst,
            "eval/worst_class": label}


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[dict], to_device: ToDevice, accelerator: Accelerator,
    reference: nn.Module | None = None,
) -> EvalMetrics:
    """Eval metrics of ``model`` over the whole eval set, identical on every rank.

    The number of classes is the width of the model's logits.

    Args:
        reference: Another model (a distillation teacher) whose top-1 the model's is compared with.

    Returns:
        ``eval/loss``, ``eval/top1``, ``eval/top5`` (percent), ``eval/samples`` (counted),
        ``eval/skipped`` (unreadable samples left out) and the :func:`balanced_metrics`; with
        ``reference``, ``eval/agreement``: the percentage of samples on which both models' top-1
        agree. The confusion matrix is its ``confusion``.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, device=accelerator.device)
    confusion = None  # sized by the first batch's logits
    skipped = 0
    for batch, images, labels in prefetch_to_device(loader, to_device):
        logits = model(images)
        if confusion is None:
            confusion = torch.zeros(logits.shape[1] ** 2 + 1, device=accelerator.device)
        sums[:4] += batch_sums(logits, labels, confusion)
        if reference is not None:
            sums[4] += agreement_hits(logits, reference(images), labels)
        skipped += len(batch["bad"])
    # float32 counts are exact up to 2**24 per cell, far above any eval set's class size.
    cells = confusion[:-1] if confusion is not None else sums.new_zeros(0)
    sums = torch.cat([sums, torch.tensor([float(skipped)], device=sums.device), cells])
    sums = accelerator.reduce(sums, reduction="sum")
    model.train(was_training)
    loss, top1, top5, n, agree, skipped = sums[:6].tolist()
    classes = math.isqrt(cells.numel())
    matrix = sums[6:].round().long().cpu().reshape(classes, classes)
    n = max(n, 1.0)
    metrics = EvalMetrics({
        "eval/loss": loss / n,
        "eval/top1": 100 * top1 / n,
        "eval/top5": 100 * top5 / n,
        "eval/samples": int(n),
        "eval/skipped": int(skipped),
        **balanced_metrics(matrix),
    })
    if reference is not None:
        metrics["eval/agreement"] = 100 * agree / n
    metrics.confusion = matrix
    return metrics


@torch.no_grad()
def sample_hits(
    model: nn.Module, loader: Iterable[dict], to_device: ToDevice, accelerator: Accelerator
) -> dict[str, bool]:
    """Whether each real eval sample (by key) is classified right (top-1), gathered to every rank."""
    was_training = model.training
    model.eval()
    mine: dict[str, bool] = {}
    for batch, images, labels in prefetch_to_device(loader, to_device):
        right = (model(images).argmax(dim=1) == labels).tolist()
        mine.update((k, r) for k, r, y in zip(batch["key"], right, batch["label"].tolist()) if y >= 0)
    model.train(was_training)
    return {k: v for part in gather_object([mine]) for k, v in part.items()}
