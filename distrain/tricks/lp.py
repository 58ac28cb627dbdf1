"""Label propagation (Iscen et al. 2019, "Label Propagation for Deep Semi-supervised Learning"):
the pieces, each a pure function of arrays.

1. :func:`knn_rows`: each sample's ``k`` nearest neighbours by cosine similarity of L2-normalised
   features, self excluded; an exact blocked search over any slice of the query rows, so that N
   ranks can each search N / ranks rows against the whole set.
2. :func:`normalized_affinity`: ``W`` from the similarities (clamped at 0, raised to ``power``),
   ``W + W^T`` with a zero diagonal, then ``S = D^-1/2 W D^-1/2``.
3. :func:`diffuse`: for each class ``c`` (any subset, so ranks can split the classes), conjugate
   gradient on ``(I - alpha S) z = y_c``, ``y_c`` being ``1 / |L_c|`` on the labeled samples of
   class ``c`` (scipy's ``cg``: the system is symmetric positive definite for ``alpha < 1``).
4. :func:`pseudo_labels`: argmax of the row-normalised, non-negative ``Z``; certainty weight
   ``1 - H(z) / log C`` divided by its maximum; labeled samples keep their label with weight 1;
   class weights ``(N / C) / |pseudo-class|``.

The settings and the order of operations are those of the reference code (ahmetius/LP-DeepSSL,
``update_plabels``), except that the self-match is excluded by index rather than assumed to come
first (it need not with duplicate images), and an isolated sample (zero degree) keeps a zero row.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch


def knn_rows(features: torch.Tensor, k: int, start: int = 0, stop: int | None = None,
             block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest neighbours of rows ``start:stop`` of ``features`` among all its rows.

    Exact: each block of ``block`` query rows is compared with every row by one matrix product
    (memory ``4 x block x N`` bytes), and ``topk`` keeps the best ``k``; the query itself is
    excluded by index.

    Args:
        features: (N, d) L2-normalised features.
        k: Neighbours per row (at most N - 1).
        start, stop: The query rows (default: all).

    Returns:
        (similarities (n, k) float32, indices (n, k) int64), best first, for the n query rows.
    """
    n = features.shape[0]
    stop = n if stop is None else stop
    if not 0 < k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} samples, got {k}")
    sims, idx = [], []
    for lo in range(start, stop, block):
        hi = min(lo + block, stop)
        s = features[lo:hi] @ features.T
        s[torch.arange(hi - lo), torch.arange(lo, hi)] = -math.inf
        top = s.topk(k, dim=1)
        sims.append(top.values.float())
        idx.append(top.indices)
    if not sims:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int64)
    return torch.cat(sims), torch.cat(idx)


def normalized_affinity(sims: np.ndarray, idx: np.ndarray, power: float = 3.0) -> scipy.sparse.csr_matrix:
    """The symmetrically normalised affinity ``S = D^-1/2 (W + W^T) D^-1/2`` of a kNN graph.

    Args:
        sims: (N, k) similarities of each row's neighbours; negative ones count as 0.
        idx: (N, k) the neighbours' row indices.
        power: ``W_ij = max(sim, 0) ** power`` (the paper's gamma, 3).
    """
    n, k = idx.shape
    values = np.clip(sims.astype(np.float64), 0, None) ** power
    rows = np.repeat(np.arange(n), k)
    w = scipy.sparse.csr_matrix((values.ravel(), (rows, idx.ravel())), shape=(n, n))
    w = w + w.T
    w.setdiag(0)
    w.eliminate_zeros()
    degree = np.asarray(w.sum(axis=1)).ravel()
    degree[degree == 0] = 1  # an isolated sample: its row stays zero
    d = scipy.sparse.diags(1.0 / np.sqrt(degree))
    return (d @ w @ d).tocsr()


def diffuse(s: scipy.sparse.csr_matrix, labels: np.ndarray, classes: list[int] | range, alpha: float = 0.99,
            iters: int = 20) -> np.ndarray:
    """Solve ``(I - alpha S) z_c = y_c`` for each class ``c`` in ``classes`` by conjugate gradient.

    ``y_c`` is ``1 / |L_c|`` on the labeled samples of class ``c`` and 0 elsewhere, so every class
    enters with the same mass whatever its number of labels. A class without labels gets a zero
    column.

    Args:
        s: The normalised affinity (:func:`normalized_affinity`).
        labels: (N,) class of each labeled sample, negative for unlabeled ones.
        classes: The classes to solve for (a rank's share).
        iters: Conjugate-gradient iterations (the reference: 20, tolerance 1e-6).

    Returns:
        (N, len(classes)) float64.
    """
    n = s.shape[0]
    a = scipy.sparse.identity(n, format="csr") - alpha * s
    z = np.zeros((n, len(classes)))
    for j, c in enumerate(classes):
        members = np.flatnonzero(labels == c)
        if members.size == 0:
            continue
        y = np.zeros(n)
        y[members] = 1.0 / members.size
        z[:, j], _ = scipy.sparse.linalg.cg(a, y, rtol=1e-6, maxiter=iters)
    return z


class PseudoLabels(NamedTuple):
    """The outcome of a propagation, by row of the feature matrix.

    Attributes:
        labels: (N,) int64: the label of a labeled sample, else the argmax of its diffused scores.
        weights: (N,) float32: 1 for labeled samples, else the certainty ``1 - H / log C``
            scaled so that its maximum is 1.
        class_weights: (C,) float32: ``(N / C) / (samples pseudo-labelled c)``.
    """

    labels: np.ndarray
    weights: np.ndarray
    class_weights: np.ndarray


def pseudo_labels(z: np.ndarray, labels: np.ndarray) -> PseudoLabels:
    """Pseudo-labels, certainty weights and class weights from the diffused scores ``z`` (N, C).

    Args:
        labels: (N,) the known labels, negative for unlabeled samples.
    """
    n, c = z.shape
    p = np.clip(z, 0, None)
    total = p.sum(axis=1, keepdims=True)
    p = np.divide(p, total, out=np.full_like(p, 1.0 / c), where=total > 0)  # no score: uniform, weight 0
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    weights = 1 - entropy / math.log(c)
    weights = weights / weights.max() if weights.max() > 0 else weights
    predicted = p.argmax(axis=1)
    known = labels >= 0
    predicted[known] = labels[known]
    weights[known] = 1.0
    counts = np.bincount(predicted, minlength=c)
    class_weights = (n / c) / np.maximum(counts, 1)
    return PseudoLabels(predicted.astype(np.int64), weights.astype(np.float32), class_weights.astype(np.float32))


def propagate(features: torch.Tensor, labels: np.ndarray, num_classes: int, k: int = 50, power: float = 3.0,
              alpha: float = 0.99, iters: int = 20, block: int = 1024) -> PseudoLabels:
    """The whole propagation in one process (tests and small sets; the objective splits it over ranks).

    Args:
        features: (N, d) L2-normalised features; labels: (N,), negative where unknown.
    """
    sims, idx = knn_rows(features, min(k, features.shape[0] - 1), block=block)
    s = normalized_affinity(sims.numpy(), idx.numpy(), power)
    return pseudo_labels(diffuse(s, labels, range(num_classes), alpha, iters), labels)
