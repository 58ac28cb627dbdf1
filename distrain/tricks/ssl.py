"""Building blocks of self-supervised pretraining: contrastive and BYOL losses, the kNN monitor.

- :func:`gather_with_grad`: all-gather of the embeddings of every rank that lets the gradient flow
  back to the rank that made each embedding, so a loss over the global batch trains every rank;
- :func:`nt_xent`: SimCLR's contrastive loss (Chen et al. 2020) over the global batch;
- :func:`byol_loss` and :func:`cosine_ema_momentum`: BYOL's regression loss and its target-network
  momentum schedule (Grill et al. 2020);
- :func:`knn_predict` / :func:`knn_scores`: the weighted kNN classifier of Wu et al. 2018 that
  InstDisc, MoCo and solo-learn use to monitor the features without training a classifier.

Every loss here is computed in float32 with autocast off, whatever the dtype of the embeddings:
cosine similarities divided by a temperature of 0.1 and pushed through ``exp`` lose too much in
bf16.

Under DDP, the per-rank loss of :func:`nt_xent` is the mean over the rank's own anchors; DDP's
mean of the gradients over ranks then equals the gradient of the loss over the global batch (see
:func:`gather_with_grad` for why).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

# The logit of an anchor against itself: far below any cosine / temperature, so exp gives exactly 0,
# yet finite, so no inf - inf can turn into NaN in the softmax or its backward.
_SELF_LOGIT = -1e9


def _world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gradients of every rank (see gather_with_grad)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # A copy: the incoming gradient may be shared with other autograd nodes and must not be
        # summed over ranks in place.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.narrow(0, dist.get_rank() * ctx.rows, ctx.rows)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` of every rank of the default process group along dim 0, with a backward.

    Forward: ``all_gather``; the result holds rank 0's rows, then rank 1's, and so on (rank ``r``'s
    own rows start at ``r * x.shape[0]``). Every rank must pass a tensor of the same shape (the
    stream gives every rank equal batches); a mismatch fails or hangs inside ``all_gather``. Every
    rank must also run the backward, since it is a collective.

    Backward: the gradient of the gathered tensor is summed over ranks (``all_reduce``) and each
    rank keeps the rows of its own ``x``. Why the sum: a contrastive loss makes every rank's loss
    ``L_s`` depend on the embeddings ``z_r`` of every rank ``r`` (they are its negatives), so the
    gradient that ``z_r`` must receive is ``sum_s dL_s/dz_r``, and rank ``s`` holds the term
    ``dL_s/dz_r`` in its slice ``r`` of the gathered gradient. A plain ``all_gather`` (no backward)
    keeps only ``dL_r/dz_r``: the loss has the right value, but the gradient silently misses every
    cross-rank term.

    How this composes with DDP: let each rank's loss be ``L_r`` = the mean of the loss over its own
    anchors, so the global loss (the mean over all anchors, equal local batches) is
    ``L = (1/W) sum_r L_r``. Rank ``r``'s backward gives its embeddings ``sum_s dL_s/dz_r =
    W dL/dz_r``, i.e. the gradient of ``W L``, not ``L``, with respect to the activations; DDP then
    averages the parameter gradients over the ``W`` ranks, which divides that ``W`` back out:
    ``(1/W) sum_r (dz_r/dθ)^T W dL/dz_r = dL/dθ``. So the parameters get exactly the gradient of
    the global-batch loss, as one process holding the whole batch would compute. Do not divide the
    loss by ``W`` or skip DDP's averaging (e.g. a hand-written sum all-reduce) on top of this.

    Args:
        x: This rank's tensor, shape ``(n, ...)``.

    Returns:
        The ``(W * n, ...)`` concatenation over ranks; ``x`` itself when torch.distributed is not
        initialised or the world size is 1.
    """
    if _world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather: bool = True) -> torch.Tensor:
    """SimCLR's NT-Xent loss (Chen et al. 2020) of two views, with the global batch as negatives.

    The embeddings are L2-normalised; anchor ``i``'s logits are its cosine similarities to every
    other embedding of the global batch (both views, all ranks) divided by ``temperature``, its
    positive is the other view of the same sample and the other ``2N - 2`` are negatives (``N`` =
    global batch). The loss is the cross-entropy of the positive, averaged over this rank's ``2n``
    anchors. With ``gather`` and equal local batches on every rank, the mean of this over ranks is
    the single-process loss over the global batch, and under DDP the parameters get that loss's
    gradient (:func:`gather_with_grad` explains why). Computed in float32 with autocast off.

    Args:
        z1: This rank's embeddings of the first view, ``(n, d)``.
        z2: Those of the second view, ``(n, d)``; row ``i`` is the same sample as ``z1``'s row ``i``.
        temperature: The softmax temperature (> 0); SimCLR uses 0.5 on CIFAR, 0.1 on ImageNet.
        gather: Take the negatives from every rank (:func:`gather_with_grad`); otherwise from this
            rank's batch only.

    Returns:
        The scalar float32 loss.

    Raises:
        ValueError: If the views' shapes differ or the temperature is not positive.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"nt_xent: two (n, d) views of one shape expected, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"nt_xent: temperature must be > 0, got {temperature}")
    with torch.autocast(device_type=z1.device.type, enabled=False):
        local = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        keys = gather_with_grad(local) if gather else local
        # Within the gathered keys, this rank's [z1; z2] block starts at rank * 2n.
        offset = _world()[0] * local.shape[0] if gather else 0
        n = z1.shape[0]
        rows = torch.arange(2 * n, device=local.device)
        logits = (local @ keys.T) / temperature
        logits = logits.scatter(1, (offset + rows)[:, None], _SELF_LOGIT)
        positives = offset + (rows + n) % (2 * n)
        return F.cross_entropy(logits, positives)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's loss (Grill et al. 2020): ``2 - 2 cos(p, z)`` per sample, averaged over the batch.

    ``z`` (the target network's projection) is detached: the target learns only through the
    momentum update. BYOL symmetrises over the views: ``byol_loss(p1, z2) + byol_loss(p2, z1)``.
    No gathering: each sample's loss involves that sample only, so DDP's mean of the per-rank
    gradients is already the global-batch gradient. Computed in float32 with autocast off.

    Args:
        p: The online network's predictions, ``(n, d)``.
        z: The target network's projections of the other view, ``(n, d)``.

    Returns:
        The scalar float32 loss, in ``[0, 4]``.
    """
    with torch.autocast(device_type=p.device.type, enabled=False):
        p = F.normalize(p.float(), dim=-1)
        z = F.normalize(z.detach().float(), dim=-1)
        return (2 - 2 * (p * z).sum(dim=-1)).mean()


def cosine_ema_momentum(base: float, step: int, total: int) -> float:
    """BYOL's target momentum at ``step`` of ``total``: ``1 - (1 - base) (cos(pi step / total) + 1) / 2``.

    It rises from ``base`` at step 0 to 1 at ``total``; steps past ``total`` count as ``total``
    (the cosine would otherwise bring the momentum back down).

    Args:
        base: The momentum at step 0 (BYOL: 0.996).
        step: Optimizer updates done.
        total: Optimizer updates of the whole run (> 0).

    Returns:
        The factor the target's weights are multiplied by before adding ``1 - momentum`` x online.
    """
    if total <= 0:
        raise ValueError(f"cosine_ema_momentum: total must be > 0, got {total}")
    step = min(max(step, 0), total)
    return 1 - (1 - base) * (math.cos(math.pi * step / total) + 1) / 2


def _knn_chunk_scores(features: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                      k: int, temperature: float, chunk: int) -> Iterator[torch.Tensor]:
    """The class scores of :func:`knn_scores`, one ``(≤ chunk, num_classes)`` block of queries at a time."""
    if k < 1 or temperature <= 0 or chunk < 1:
        raise ValueError(f"knn: k and chunk must be >= 1 and temperature > 0, got {k}, {chunk}, {temperature}")
    if bank.shape[0] != bank_labels.shape[0] or bank.shape[0] == 0:
        raise ValueError(f"knn: a non-empty bank with one label per row expected, got {bank.shape[0]} rows "
                         f"and {bank_labels.shape[0]} labels")
    with torch.autocast(device_type=features.device.type, enabled=False):
        bank = F.normalize(bank.float(), dim=1)
        size = bank.shape[0]
        for start in range(0, features.shape[0], chunk):
            query = F.normalize(features[start:start + chunk].float(), dim=1)
            sims = query @ bank.T
            # One neighbour more than needed shows where the k-th similarity ties with the next: only
            # there does the choice among equal similarities decide the result, and topk's choice is
            # unspecified. Those rare rows are redone with a stable sort: the lower bank index wins.
            # A k beyond the bank needs no tie-break: the slices take every row.
            top = sims.topk(min(k + 1, size), dim=1)
            top_sims, top_idx = top.values[:, :k], top.indices[:, :k]
            if k < size:
                tied = top.values[:, k - 1] == top.values[:, k]
                if tied.any():
                    order = sims[tied].sort(dim=1, descending=True, stable=True).indices[:, :k]
                    top_idx[tied] = order
                    top_sims[tied] = sims[tied].gather(1, order)
            scores = torch.zeros(query.shape[0], num_classes, device=query.device)
            yield scores.scatter_add_(1, bank_labels[top_idx].long(), (top_sims / temperature).exp())


def knn_scores(features: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
               k: int = 200, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """The class scores of the weighted kNN classifier of Wu et al. 2018 (InstDisc; MoCo's monitor).

    Both ``features`` and ``bank`` are L2-normalised here (normalising already normalised rows is
    harmless), so similarities are cosines. Each query takes its ``k`` most similar bank rows;
    neighbour ``j`` votes ``exp(sim_j / temperature)`` for its label and a class's score is the sum
    of its votes. ``k`` larger than the bank is clamped to the bank's size (every row votes). Among
    bank rows of equal similarity at the k-th place, the lower bank index is taken. Computed in
    float32.

    The queries are processed ``chunk`` at a time, so memory stays bounded whatever their number:
    besides a float32 normalised copy of the bank (``4 B d`` bytes, ``B`` = bank rows, ``d`` =
    feature size), a block needs about ``4 chunk B`` bytes for its similarities plus
    ``chunk (24 (k + 1) + 4 C)`` for the neighbours and scores (``C`` = classes); a block whose k-th
    similarity ties sorts its tied rows, up to ``12 chunk B`` bytes more. For a 50k x 50k monitor
    with ``d`` = 512 and the default chunk of 1024: about 100 MB of bank and 205 MB per block, where
    the full similarity matrix would take 10 GB.

    Args:
        features: The queries, ``(Q, d)``.
        bank: The labelled features, ``(B, d)``, on the device of ``features``.
        bank_labels: Their int labels in ``[0, num_classes)``, ``(B,)``.
        num_classes: Classes ``C``.
        k: Neighbours per query (>= 1).
        temperature: Temperature of the votes (> 0).
        chunk: Queries per block (>= 1).

    Returns:
        ``(Q, C)`` float32 scores.
    """
    # An empty cat for no query: a rank whose eval share is all padding or bad data has none.
    empty = features.new_zeros(0, num_classes, dtype=torch.float32)
    return torch.cat([empty, *_knn_chunk_scores(features, bank, bank_labels, num_classes, k, temperature, chunk)])


def knn_predict(features: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """The weighted kNN classifier's predicted labels: the best-scored class of :func:`knn_scores`.

    A tie between class scores goes to the lowest class index. Takes the same arguments and has the
    same memory bound as :func:`knn_scores`, without holding the ``(Q, C)`` scores of every query.

    Returns:
        ``(Q,)`` int64 labels.
    """
    empty = torch.zeros(0, dtype=torch.long, device=features.device)  # no query on this rank (see knn_scores)
    return torch.cat([empty, *(scores.argmax(dim=1)
                               for scores in _knn_chunk_scores(features, bank, bank_labels, num_classes, k, temperature,
                                                               chunk))])
