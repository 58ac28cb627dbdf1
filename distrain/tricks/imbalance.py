"""Class-imbalance losses: class weights (with deferred re-weighting), focal loss, logit adjustment.

One loss covers every combination, with int labels or soft (MixUp/CutMix) targets and label
smoothing. For a micro-batch with target rows ``q_i`` (one-hot, mixed, then smoothed as
``(1 - eps) q_i + eps / C``; all-zero rows, label -1, count for nothing)::

    z_i    = logits_i + tau x log(prior)              logit adjustment (Menon et al. 2021)
    ce_i   = -sum_c q_ic log softmax(z_i)_c           the unweighted cross-entropy
    f_i    = (1 - exp(-ce_i))^gamma                   focal term (Lin et al. 2017); 1 when gamma = 0
    s_i    = sum_c q_ic w_c                           the target's class weight (1 without weights)
    loss   = sum_i s_i f_i ce_i / sum_i s_i

With one-hot targets ``exp(-ce_i)`` is Lin et al.'s ``p_t``, and with weights and ``gamma = 0`` the
loss is ``F.cross_entropy(weight=w)``'s weighted mean. The focal term is taken from the
*unweighted* cross-entropy: a widely copied implementation (LDAM-DRW's ``FocalLoss``) takes it
from the weighted one, which makes ``p_t`` of a rare class with weight 5 the fifth power of the
true one.

Weights and prior come from the class frequencies the model is trained on: the shard index's
counts, or their resampled expansion under ``data.resample`` (so class-balanced sampling makes the
prior uniform and logit adjustment a no-op, as it should be).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from distrain.errors import DistrainError

WEIGHTS = ("none", "inverse", "sqrt_inverse", "effective_number")


def class_weights(counts: np.ndarray, kind: str, beta: float = 0.9999) -> torch.Tensor:
    """Per-class loss weights, normalised to average 1 over the classes that have samples.

    Args:
        counts: Samples per class.
        kind: ``inverse`` (1/n), ``sqrt_inverse`` (1/sqrt(n)) or ``effective_number``
            ((1 - beta) / (1 - beta^n), Cui et al. 2019).
        beta: ``beta`` of ``effective_number``.

    Returns:
        float32 (C,) weights; 0 for classes without samples.
    """
    n = np.asarray(counts, dtype=np.float64)
    present = n > 0
    safe = np.where(present, n, 1.0)
    if kind == "inverse":
        w = 1.0 / safe
    elif kind == "sqrt_inverse":
        w = 1.0 / np.sqrt(safe)
    elif kind == "effective_number":
        w = (1.0 - beta) / (1.0 - np.power(beta, safe))
    else:
        raise ValueError(f"unknown class weights {kind!r}; expected one of {WEIGHTS}")
    w = np.where(present, w, 0.0)
    return torch.tensor(w * present.sum() / w.sum(), dtype=torch.float32)


def log_prior(counts: np.ndarray) -> torch.Tensor:
    """log of each class's share of the samples; a class without samples counts as one sample."""
    n = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    return torch.tensor(np.log(n / n.sum()), dtype=torch.float32)


def imbalance_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    gamma: float = 0.0,
    smoothing: float = 0.0,
    logit_shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """The class-weighted, focal, logit-adjusted cross-entropy of the module docstring.

    Args:
        logits: (B, C) scores.
        targets: int64 (B,) labels (-1 ignored) or (B, C) probability rows (all-zero rows ignored).
        weights: (C,) class weights, or None.
        gamma: Focal exponent; 0 is plain cross-entropy.
        smoothing: Label smoothing ``eps``.
        logit_shift: (C,) added to the logits (tau x log prior), or None.

    Returns:
        The scalar loss in float32; 0 for a batch without a counted row.
    """
    logits = logits.float()
    num_classes = logits.shape[1]
    if targets.dim() == 1:
        q = F.one_hot(targets.clamp_min(0), num_classes).float() * (targets >= 0).unsqueeze(1)
    else:
        q = targets.float()
    mass = q.sum(1)
    if smoothing:
        q = (1.0 - smoothing) * q + smoothing / num_classes * mass.unsqueeze(1)
    if logit_shift is not None:
        logits = logits + logit_shift.to(logits.device)
    ce = -(q * F.log_softmax(logits, dim=1)).sum(1)
    per_row = ce if gamma == 0 else (1.0 - torch.exp(-ce)).clamp_min(0).pow(gamma) * ce
    s = mass if weights is None else q @ weights.to(logits.device)
    return (s * per_row).sum() / s.sum().clamp_min(torch.finfo(torch.float32).tiny)


class ImbalanceLoss:
    """The run's label loss under ``loss.*``: :func:`imbalance_loss` with weights that switch on
    at ``reweight_epoch`` (deferred re-weighting, Cao et al. 2019).

    Args:
        frequencies: Samples of each class per epoch as trained.
        weighting: ``loss.class_weights``; beta: ``loss.beta``.
        reweight_epoch: Epoch from which the weights apply (0: from the start).
        gamma: ``loss.focal_gamma``; tau: ``loss.logit_adjust_tau``; smoothing: label smoothing.
    """

    def __init__(self, frequencies: np.ndarray, weighting: str, beta: float, reweight_epoch: float,
                 gamma: float, tau: float, smoothing: float):
        self.weights = None if weighting == "none" else class_weights(frequencies, weighting, beta)
        self.reweight_epoch, self.gamma, self.smoothing = reweight_epoch, gamma, smoothing
        self.shift = tau * log_prior(frequencies) if tau else None
        self.epoch = 0.0

    def set_epoch(self, epoch: float) -> None:
        """Where training is (fractional epochs): the weights apply from ``reweight_epoch`` on."""
        self.epoch = epoch

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        weights = self.weights if self.epoch >= self.reweight_epoch else None
        return imbalance_loss(logits, targets, weights, self.gamma, self.smoothing, self.shift)


def needs_counts(loss_cfg) -> bool:
    """Whether ``loss.*`` asks for class counts (weights or logit adjustment)."""
    return loss_cfg.class_weights != "none" or loss_cfg.logit_adjust_tau > 0


def enabled(loss_cfg) -> bool:
    """Whether any class-imbalance term of ``loss.*`` is on."""
    return needs_counts(loss_cfg) or loss_cfg.focal_gamma > 0


def make_loss(loss_cfg, frequencies: np.ndarray | None, smoothing: float, where: str) -> ImbalanceLoss:
    """The :class:`ImbalanceLoss` of ``loss.*``.

    Args:
        where: The training shards, named when their index lacks class counts.

    Raises:
        DistrainError: weights or logit adjustment without class counts in the shard index.
    """
    if frequencies is None:
        if needs_counts(loss_cfg):
            key = "loss.class_weights" if loss_cfg.class_weights != "none" else "loss.logit_adjust_tau"
            raise DistrainError(f"{key}: needs class counts, and the index of {where} has none; add them with "
                                "`distrain data index DIR`")
        frequencies = np.ones(1)
    return ImbalanceLoss(frequencies, loss_cfg.class_weights, loss_cfg.beta, loss_cfg.reweight_epoch,
                         loss_cfg.focal_gamma, loss_cfg.logit_adjust_tau, smoothing)
