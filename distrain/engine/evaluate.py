"""Distributed evaluation that counts every sample exactly once.

Each rank evaluates its own slice of the eval shards (padded with label -1 to the same number of
batches on every rank), sums loss and hits over real samples only, and one all-reduce adds the
sums. No padding duplicates, so accuracy is identical on 1, 2 or N ranks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from distrain.data.device import ToDevice, prefetch_to_device
from distrain.tricks.distill import agreement_hits


def batch_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[loss sum, top-1 hits, top-5 hits, count] over the samples whose label is >= 0."""
    real = labels >= 0
    logits, labels = logits[real].float(), labels[real]
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    hits = topk == labels[:, None]
    return torch.stack(
        [
            F.cross_entropy(logits, labels, reduction="sum"),
            hits[:, 0].sum().float(),
            hits.any(dim=1).sum().float(),
            torch.tensor(float(labels.numel()), device=logits.device),
        ]
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[dict], to_device: ToDevice, accelerator: Accelerator,
    reference: nn.Module | None = None,
) -> dict[str, float]:
    """Eval metrics of ``model`` over the whole eval set, identical on every rank.

    Args:
        reference: Another model (a distillation teacher) whose top-1 the model's is compared with.

    Returns:
        ``eval/loss``, ``eval/top1``, ``eval/top5`` (percent), ``eval/samples`` (counted) and
        ``eval/skipped`` (unreadable samples left out); with ``reference``, ``eval/agreement``:
        the percentage of samples on which both models' top-1 agree.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, device=accelerator.device)
    skipped = 0
    for batch, images, labels in prefetch_to_device(loader, to_device):
        logits = model(images)
        sums[:4] += batch_sums(logits, labels)
        if reference is not None:
            sums[4] += agreement_hits(logits, reference(images), labels)
        skipped += len(batch["bad"])
    sums = torch.cat([sums, torch.tensor([float(skipped)], device=sums.device)])
    sums = accelerator.reduce(sums, reduction="sum")
    model.train(was_training)
    loss, top1, top5, n, agree, skipped = sums.tolist()
    n = max(n, 1.0)
    metrics = {
        "eval/loss": loss / n,
        "eval/top1": 100 * top1 / n,
        "eval/top5": 100 * top5 / n,
        "eval/samples": int(n),
        "eval/skipped": int(skipped),
    }
    if reference is not None:
        metrics["eval/agreement"] = 100 * agree / n
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
