"""Class weights, focal loss, logit adjustment and deferred re-weighting against hand computations,
with int labels, label smoothing and soft (MixUp) targets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distrain.config import from_dict
from distrain.errors import DistrainError
from distrain.tricks.imbalance import ImbalanceLoss, class_weights, imbalance_loss, log_prior, make_loss
from distrain.tricks.mix import soft_cross_entropy

COUNTS = np.array([40, 20, 10, 4])


def batch(seed=0, n=6, c=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 2, torch.tensor([0, 3, 1, 3, 2, -1])


def test_class_weights_by_hand():
    inv = 1 / COUNTS
    np.testing.assert_allclose(class_weights(COUNTS, "inverse"), inv * 4 / inv.sum(), rtol=1e-6)
    sq = 1 / np.sqrt(COUNTS)
    np.testing.assert_allclose(class_weights(COUNTS, "sqrt_inverse"), sq * 4 / sq.sum(), rtol=1e-6)
    eff = (1 - 0.99) / (1 - 0.99 ** COUNTS)
    np.testing.assert_allclose(class_weights(COUNTS, "effective_number", 0.99), eff * 4 / eff.sum(), rtol=1e-6)
    # an empty class gets weight 0 and the others still average 1
    w = class_weights(np.array([10, 0, 30]), "inverse")
    assert w[1] == 0 and math.isclose(float(w[0] + w[2]), 2.0, rel_tol=1e-6)


def test_without_terms_it_is_the_plain_losses():
    logits, labels = batch()
    plain = nn.CrossEntropyLoss(label_smoothing=0.1, ignore_index=-1)(logits, labels)
    torch.testing.assert_close(imbalance_loss(logits, labels, smoothing=0.1), plain)
    soft = torch.softmax(torch.randn(6, 4), 1)
    soft[5] = 0  # a label -1 row
    torch.testing.assert_close(imbalance_loss(logits, soft, smoothing=0.1), soft_cross_entropy(logits, soft, 0.1))


def test_weights_give_the_weighted_mean_cross_entropy():
    logits, labels = batch()
    w = class_weights(COUNTS, "inverse")
    expected = F.cross_entropy(logits, labels, weight=w, ignore_index=-1)
    torch.testing.assert_close(imbalance_loss(logits, labels, w), expected)


def test_focal_term_comes_from_the_unweighted_cross_entropy():
    logits, labels = batch(1)
    w, gamma = class_weights(COUNTS, "inverse"), 2.0
    num = den = 0.0
    shipped_bug = 0.0
    for z, y in zip(logits, labels.tolist()):
        if y < 0:
            continue
        p = torch.softmax(z, 0)[y].item()
        num += w[y].item() * (1 - p) ** gamma * -math.log(p)
        den += w[y].item()
        p_weighted = math.exp(w[y].item() * math.log(p))  # exp(-weighted CE), as LDAM-DRW's FocalLoss
        shipped_bug += w[y].item() * (1 - p_weighted) ** gamma * -math.log(p)
    got = imbalance_loss(logits, labels, w, gamma=gamma).item()
    assert math.isclose(got, num / den, rel_tol=1e-5)
    assert not math.isclose(got, shipped_bug / den, rel_tol=1e-3)


def test_focal_weights_and_smoothing_on_soft_targets_by_hand():
    logits, _ = batch(2)
    q = torch.softmax(torch.randn(6, 4, generator=torch.Generator().manual_seed(5)), 1)
    q[5] = 0
    w, eps, gamma = class_weights(COUNTS, "effective_number", 0.9), 0.1, 1.5
    num = den = 0.0
    for z, row in zip(logits, q):
        mass = row.sum().item()
        if mass == 0:
            continue
        t = (1 - eps) * row + eps / 4 * mass
        ce = -(t * torch.log_softmax(z, 0)).sum().item()
        s = (t * w).sum().item()
        num += s * (1 - math.exp(-ce)) ** gamma * ce
        den += s
    assert math.isclose(imbalance_loss(logits, q, w, gamma, eps).item(), num / den, rel_tol=1e-5)


def test_logit_adjustment_adds_tau_log_prior():
    logits, labels = batch(3)
    tau = 1.0
    prior = COUNTS / COUNTS.sum()
    shifted = logits + tau * torch.tensor(np.log(prior), dtype=torch.float32)
    torch.testing.assert_close(log_prior(COUNTS), torch.tensor(np.log(prior), dtype=torch.float32))
    loss = ImbalanceLoss(COUNTS, "none", 0.9999, 0.0, 0.0, tau, 0.0)
    torch.testing.assert_close(loss(logits, labels), F.cross_entropy(shifted, labels, ignore_index=-1))
    # a rare class's logit is pushed down in training, so the model must raise it: its loss is larger
    rare = torch.zeros(1, 4), torch.tensor([3])
    assert loss(*rare) > F.cross_entropy(*rare)


def test_deferred_reweighting_switches_weights_on_at_its_epoch():
    logits, labels = batch(4)
    loss = ImbalanceLoss(COUNTS, "inverse", 0.9999, 2.0, 0.0, 0.0, 0.0)
    loss.set_epoch(1.99)
    torch.testing.assert_close(loss(logits, labels), F.cross_entropy(logits, labels, ignore_index=-1))
    loss.set_epoch(2.0)
    w = class_weights(COUNTS, "inverse")
    torch.testing.assert_close(loss(logits, labels), F.cross_entropy(logits, labels, weight=w, ignore_index=-1))


def test_config_checks_and_missing_counts():
    with pytest.raises(DistrainError, match="loss.reweight_epoch"):
        from_dict({"loss": {"reweight_epoch": 3}})
    with pytest.raises(DistrainError, match="loss.beta"):
        from_dict({"loss": {"class_weights": "effective_number", "beta": 1.0}})
    with pytest.raises(DistrainError, match="loss.class_weights"):
        from_dict({"loss": {"class_weights": "balanced"}})
    cfg = from_dict({"loss": {"logit_adjust_tau": 1.0}})
    with pytest.raises(DistrainError, match=r"loss.logit_adjust_tau: needs class counts, and the index of data/x"):
        make_loss(cfg.loss, None, 0.0, "data/x")
    # focal alone needs no counts
    assert make_loss(from_dict({"loss": {"focal_gamma": 2.0}}).loss, None, 0.0, "data/x").gamma == 2.0
