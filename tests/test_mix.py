"""MixUp/CutMix on the device and the soft-target cross-entropy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distrain.data.index import ShardSet
from distrain.data.shards import resolve_shards
from distrain.data.stream import Augment, ShardStream
from distrain.tricks.mix import MixCut, apply_mix, cutmix_box, soft_cross_entropy

C = 10


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def batch(b: int = 6, side: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Image k is the constant k + 1 (so a pixel tells which image it came from); label k."""
    images = (torch.arange(b, dtype=torch.float32) + 1).view(b, 1, 1, 1).expand(b, 3, side, side).clone()
    return images, torch.arange(b)


def test_enabled_and_shapes():
    assert not MixCut(C, 0.0, 0.0).enabled
    assert MixCut(C, 0.2, 0.0).enabled and MixCut(C, 0.0, 1.0).enabled
    images, labels = batch()
    for mc in (MixCut(C, 0.8, 1.0), MixCut(C, 0.0, 0.0)):
        out, targets, _ = mc(images, labels, rng())
        assert out.shape == images.shape and targets.shape == (6, C) and targets.dtype == torch.float32
        assert torch.allclose(targets.sum(1), torch.ones(6))


def test_mixup_blends_each_image_with_the_previous_one():
    images, labels = batch()
    out, targets, draw = MixCut(C, mixup_alpha=0.4, cutmix_alpha=0.0)(images, labels, rng())
    lam = targets[0, 0]
    assert draw.kind == "mixup" and 0 < lam < 1 and abs(draw.lam - lam.item()) < 1e-6
    prev = images.roll(1, 0)  # as torchvision: image k with image k - 1 (not flip(0))
    assert torch.allclose(out, lam * images + (1 - lam) * prev)
    assert torch.allclose(targets, lam * F.one_hot(labels, C) + (1 - lam) * F.one_hot(labels.roll(1), C))


def test_cutmix_pastes_a_box_whose_area_is_the_target_weight():
    images, labels = batch()
    for seed in range(5):
        out, targets, draw = MixCut(C, mixup_alpha=0.0, cutmix_alpha=1.0)(images, labels, rng(seed))
        assert draw.kind == "cutmix"
        for k in range(6):
            own, prev = float(k + 1), float((k - 1) % 6 + 1)
            assert set(out[k].unique().tolist()) <= {own, prev}
            pasted = (out[k, 0] == prev).float().mean()
            assert torch.isclose(targets[k, (k - 1) % 6], pasted) and torch.isclose(targets[k, k], 1 - pasted)


def test_cutmix_box_is_clipped_and_sized_by_lambda():
    sides = []
    for seed in range(200):
        top, bottom, left, right = cutmix_box(0.75, 32, 32, rng(seed))
        assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 32
        sides.append((bottom - top, right - left))
    # sqrt(1 - 0.75) = 0.5: a 16-pixel box, smaller only where the border clips it
    assert max(sides) == (16, 16) and min(sides) < (16, 16)


@pytest.mark.parametrize("switch_prob, kind", [(1.0, "cutmix"), (0.0, "mixup")])
def test_switch_prob_picks_cutmix_or_mixup(switch_prob, kind):
    images, labels = batch()
    for seed in range(5):
        out, _, draw = MixCut(C, 0.4, 1.0, switch_prob=switch_prob)(images, labels, rng(seed))
        assert draw.kind == kind
        # CutMix only moves pixels; MixUp makes values that were in no image.
        assert (set(out.unique().tolist()) <= set(images.unique().tolist())) == (kind == "cutmix")


def test_prob_0_gives_one_hot_and_draws_nothing_when_disabled():
    images, labels = batch()
    out, targets, draw = MixCut(C, 0.8, 1.0, prob=0.0)(images, labels, rng())
    assert draw is None and torch.equal(out, images) and torch.equal(targets, F.one_hot(labels, C).float())
    g = rng(3)
    before = g.bit_generator.state
    MixCut(C, 0.0, 0.0)(images, labels, g)
    assert g.bit_generator.state == before


def test_mixing_is_a_function_of_the_generator_alone():
    images, labels = batch()
    mc = MixCut(C, 0.8, 1.0, prob=0.7)
    torch.manual_seed(0)  # the global generator plays no part
    a = [mc(images, labels, rng(s)) for s in range(6)]
    torch.manual_seed(1)
    b = [mc(images, labels, rng(s)) for s in range(6)]
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2] for x, y in zip(a, b))
    assert len({x[2] for x in a}) > 1  # different seeds, different draws


@pytest.mark.parametrize("shift", [2, 4])
def test_partner_shift_pairs_image_k_with_k_minus_shift(shift):
    images, labels = batch(8)
    out, targets, draw = MixCut(C, 0.4, 0.0, partner_shift=shift)(images, labels, rng())
    expected, _ = apply_mix(images, F.one_hot(labels, C).float(), draw, shift)
    assert torch.equal(out, expected)
    assert torch.allclose(out, draw.lam * images + (1 - draw.lam) * images.roll(shift, 0))
    with pytest.raises(ValueError):
        MixCut(C, 0.4, 0.0, partner_shift=8)(images, labels, rng())


@pytest.mark.parametrize("repeats", [2, 4])
def test_in_batch_copies_are_never_mixed_with_themselves(tmp_path, repeats):
    """With fewer ranks than repeats, copies sit next to each other in a batch: no mixed pair may be
    two copies of one key (torchvision's roll by 1 would pair (k-1)/k of them with a copy)."""
    from conftest import write_layout

    shards: ShardSet = resolve_shards(str(write_layout(tmp_path / "s", [64])))
    stream = ShardStream(shards, rank=0, world_size=1, batch_size=8, seed=0, num_classes=4,
                         augment=Augment(8, (0.5, 1.0), (0.75, 1.33), True), batches_per_epoch=4, repeats=repeats)
    assert stream.batch_copies == repeats
    # The loop's own construction (engine/objective.py) gives the stream's copies as the partner shift.
    from distrain.config import from_dict
    from distrain.engine.objective import _mixcut
    from distrain.plan import make_plan

    cfg = from_dict({"batch": {"per_device": 8}, "data": {"repeats": repeats, "train_samples": 64},
                     "mix": {"mixup_alpha": 1.0, "cutmix_alpha": 1.0}, "schedule": {"epochs": 1}})
    mc = _mixcut(cfg, 4, make_plan(cfg, 1, 64), stream.batch_copies)
    assert mc.partner_shift == repeats
    pairs = 0
    for b in stream:
        keys = b["key"]
        assert len(set(keys)) == 8 // repeats  # the batch really holds copies
        shifted = keys[-mc.partner_shift:] + keys[:-mc.partner_shift]  # roll(shift): partner of k is k - shift
        assert all(k != p for k, p in zip(keys, shifted))
        naive = keys[-1:] + keys[:-1]
        assert sum(k == p for k, p in zip(keys, naive)) == 8 - 8 // repeats  # what roll(1) would have done
        pairs += len(keys)
    assert pairs == 32


@pytest.mark.parametrize("alphas", [(0.0, 0.0), (0.4, 0.0), (0.0, 1.0)])
def test_pad_rows_get_zero_targets(alphas):
    images, _ = batch()
    labels = torch.tensor([-1, 2, 3, -1, 1, 0])
    _, targets, _ = MixCut(C, *alphas)(images, labels, rng(2))
    pad = labels < 0
    assert (targets[pad] == 0).all()
    # rows 2 and 5 follow a real row: full mass; rows 1 and 4 follow a pad row, which carries no label
    assert torch.allclose(targets[[2, 5]].sum(1), torch.ones(2))
    assert (targets[[1, 4]].sum(1) <= 1 + 1e-6).all()
    _, all_pad, _ = MixCut(C, *alphas)(images, torch.full((6,), -1), rng(2))
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
    _, targets, _ = MixCut(C, 0.0, 0.0)(torch.zeros(6, 3, 4, 4), labels, rng())
    loss = soft_cross_entropy(logits, targets, eps)
    assert torch.allclose(loss, F.cross_entropy(logits, labels, ignore_index=-1, label_smoothing=eps))
    loss.backward()
    assert (logits.grad[labels < 0] == 0).all()
    pad_only = soft_cross_entropy(logits, torch.zeros(6, C), eps)
    assert pad_only.item() == 0.0  # not NaN, as a mean over no rows would be


def test_a_batch_of_copies_of_one_sample_is_refused_when_mixing():
    from distrain.config import from_dict
    from distrain.engine.objective import _mixcut
    from distrain.errors import DistrainError
    from distrain.plan import make_plan

    cfg = from_dict({"batch": {"per_device": 4}, "data": {"repeats": 4, "train_samples": 64},
                     "mix": {"mixup_alpha": 0.2}, "schedule": {"epochs": 1}})
    with pytest.raises(DistrainError, match="mixed with its own copy"):
        _mixcut(cfg, 4, make_plan(cfg, 1, 64), 4)
    assert not _mixcut(from_dict({"batch": {"per_device": 4}}), 4, make_plan(cfg, 1, 64), 4).enabled
