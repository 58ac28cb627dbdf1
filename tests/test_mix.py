"""MixUp/CutMix on the device and the soft-target cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distrain.tricks.mix import MixCut, soft_cross_entropy

C = 10


def batch(b: int = 6, side: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Image k is the constant k + 1 (so a pixel tells which image it came from); label k."""
    images = (torch.arange(b, dtype=torch.float32) + 1).view(b, 1, 1, 1).expand(b, 3, side, side).clone()
    return images, torch.arange(b)


def test_enabled_and_shapes():
    assert not MixCut(C, 0.0, 0.0).enabled
    assert MixCut(C, 0.2, 0.0).enabled and MixCut(C, 0.0, 1.0).enabled
    images, labels = batch()
    for mc in (MixCut(C, 0.8, 1.0), MixCut(C, 0.0, 0.0)):
        out, targets = mc(images, labels)
        assert out.shape == images.shape and targets.shape == (6, C) and targets.dtype == torch.float32
        assert torch.allclose(targets.sum(1), torch.ones(6))


def test_mixup_blends_each_image_with_the_previous_one():
    torch.manual_seed(0)
    images, labels = batch()
    out, targets = MixCut(C, mixup_alpha=0.4, cutmix_alpha=0.0)(images, labels)
    lam = targets[0, 0]
    assert 0 < lam < 1
    prev = images.roll(1, 0)  # torchvision pairs image k with image k - 1 (not flip(0))
    assert torch.allclose(out, lam * images + (1 - lam) * prev)
    assert torch.allclose(targets, lam * F.one_hot(labels, C) + (1 - lam) * F.one_hot(labels.roll(1), C))


def test_cutmix_pastes_a_box_whose_area_is_the_target_weight():
    torch.manual_seed(1)
    images, labels = batch()
    out, targets = MixCut(C, mixup_alpha=0.0, cutmix_alpha=1.0)(images, labels)
    for k in range(6):
        own, prev = float(k + 1), float((k - 1) % 6 + 1)
        assert set(out[k].unique().tolist()) <= {own, prev}
        pasted = (out[k, 0] == prev).float().mean()
        assert 0 < pasted < 1
        assert torch.isclose(targets[k, (k - 1) % 6], pasted) and torch.isclose(targets[k, k], 1 - pasted)


@pytest.mark.parametrize("switch_prob, kind", [(1.0, "cutmix"), (0.0, "mixup")])
def test_switch_prob_picks_cutmix_or_mixup(switch_prob, kind):
    images, labels = batch()
    for seed in range(5):
        torch.manual_seed(seed)
        out, _ = MixCut(C, 0.4, 1.0, switch_prob=switch_prob)(images, labels)
        # CutMix only moves pixels; MixUp makes values that were in no image.
        assert (set(out.unique().tolist()) <= set(images.unique().tolist())) == (kind == "cutmix")


def test_prob_0_gives_one_hot_and_draws_nothing():
    images, labels = batch()
    out, targets = MixCut(C, 0.8, 1.0, prob=0.0)(images, labels)
    assert torch.equal(out, images) and torch.equal(targets, F.one_hot(labels, C).float())
    state = torch.get_rng_state()
    MixCut(C, 0.0, 0.0)(images, labels)
    assert torch.equal(torch.get_rng_state(), state)


def test_mixing_is_deterministic_under_the_global_generator():
    images, labels = batch()
    mc = MixCut(C, 0.8, 1.0, prob=0.7)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append([mc(images, labels) for _ in range(4)])
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*runs))


@pytest.mark.parametrize("alphas", [(0.0, 0.0), (0.4, 0.0), (0.0, 1.0)])
def test_pad_rows_get_zero_targets(alphas):
    torch.manual_seed(2)
    images, _ = batch()
    labels = torch.tensor([-1, 2, 3, -1, 1, 0])
    _, targets = MixCut(C, *alphas)(images, labels)
    pad = labels < 0
    assert (targets[pad] == 0).all()
    # rows 2 and 5 follow a real row: full mass; rows 1 and 4 follow a pad row, which carries no label
    assert torch.allclose(targets[[2, 5]].sum(1), torch.ones(2))
    assert (targets[[1, 4]].sum(1) <= 1 + 1e-6).all()
    _, all_pad = MixCut(C, *alphas)(images, torch.full((6,), -1))
    assert (all_pad == 0).all()


def manual(logits: torch.Tensor, targets: torch.Tensor, eps: float) -> torch.Tensor:
    smoothed = (1 - eps) * targets + eps / logits.shape[1]
    return -(smoothed * logits.log_softmax(1)).sum(1).mean()


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_soft_cross_entropy_is_the_textbook_formula(eps):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, C, generator=g)
    targets = torch.rand(8, C, generator=g).softmax(1)
    assert torch.allclose(soft_cross_entropy(logits, targets, eps), manual(logits, targets, eps))
    # torch's own composition of probability targets and smoothing is that same formula
    assert torch.allclose(F.cross_entropy(logits, targets, label_smoothing=eps), manual(logits, targets, eps))
    labels = torch.randint(0, C, (8,), generator=g)
    one_hot = F.one_hot(labels, C).float()
    expected = F.cross_entropy(logits, labels, label_smoothing=eps)
    assert torch.allclose(soft_cross_entropy(logits, one_hot, eps), expected)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_soft_cross_entropy_ignores_pad_rows(eps):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, C, generator=g, requires_grad=True)
    labels = torch.tensor([-1, 2, 3, -1, 1, 0])
    _, targets = MixCut(C, 0.0, 0.0)(torch.zeros(6, 3, 4, 4), labels)
    loss = soft_cross_entropy(logits, targets, eps)
    assert torch.allclose(loss, F.cross_entropy(logits, labels, ignore_index=-1, label_smoothing=eps))
    loss.backward()
    assert (logits.grad[labels < 0] == 0).all()
    pad_only = soft_cross_entropy(logits, torch.zeros(6, C), eps)
    assert pad_only.item() == 0.0  # not NaN, as a mean over no rows would be
