"""``model.init``: each scheme's weight statistics match its formula on layers of several shapes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distrain.errors import DistrainError
from distrain.models.init import init_weights


def _model() -> nn.Sequential:
    # Square, wide, tall, grouped, 1x1, 1-d and 3-d layers; a norm layer that must stay untouched.
    return nn.Sequential(
        nn.Conv2d(3, 48, 3),
        nn.BatchNorm2d(48),
        nn.Conv2d(48, 96, 3, groups=4, bias=False),
        nn.Conv2d(96, 24, 1),
        nn.Conv1d(8, 40, 5),
        nn.Conv3d(4, 12, 3),
        nn.Linear(512, 256),
        nn.Linear(64, 300),
    )


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]


def _fans(w: torch.Tensor) -> tuple[int, int]:
    receptive = w[0][0].numel()
    return w.shape[1] * receptive, w.shape[0] * receptive


def _truncated_variance(bound: float) -> float:
    """Variance of a standard normal truncated to [-bound, bound]."""
    pdf = math.exp(-bound * bound / 2) / math.sqrt(2 * math.pi)
    return 1 - 2 * bound * pdf / math.erf(bound / math.sqrt(2))


def _assert_variance(w: torch.Tensor, expected: float) -> None:
    n = w.numel()
    # The sample variance of n draws has relative sd sqrt(2/n); 4 sd leaves no flaky margin.
    assert w.var().item() == pytest.approx(expected, rel=4 * math.sqrt(2 / n)), (tuple(w.shape), expected)
    assert abs(w.mean().item()) < 4 * math.sqrt(expected / n)


def _biases_zero(model: nn.Module) -> None:
    for m in _layers(model):
        assert m.bias is None or not m.bias.any()


@pytest.mark.parametrize("scheme, gain, variance", [
    ("he", None, lambda fan_in, fan_out: 2 / fan_in),
    ("xavier", None, lambda fan_in, fan_out: 2 / (fan_in + fan_out)),
    ("xavier", 0.5, lambda fan_in, fan_out: 0.25 * 2 / (fan_in + fan_out)),
    ("trunc_normal", None, lambda fan_in, fan_out: 0.02**2 * _truncated_variance(2)),
    ("trunc_normal", 0.1, lambda fan_in, fan_out: 0.1**2 * _truncated_variance(2)),
])
def test_variance_follows_the_formula(scheme, gain, variance):
    torch.manual_seed(0)
    model = _model()
    bn = {k: v.clone() for k, v in model[1].state_dict().items()}
    init_weights(model, scheme, gain)
    for m in _layers(model):
        _assert_variance(m.weight, variance(*_fans(m.weight)))
    _biases_zero(model)
    assert all(torch.equal(v, model[1].state_dict()[k]) for k, v in bn.items())


@pytest.mark.parametrize("gain", [None, 2.0])
def test_trunc_normal_is_bounded_at_two_std(gain):
    torch.manual_seed(0)
    model = _model()
    init_weights(model, "trunc_normal", gain)
    std = gain or 0.02
    for m in _layers(model):
        assert m.weight.abs().max().item() <= 2 * std
        assert m.weight.abs().max().item() > 1.8 * std  # truncated there, not narrower


@pytest.mark.parametrize("gain", [None, 1.5])
def test_orthogonal_rows_or_columns_are_orthonormal(gain):
    torch.manual_seed(0)
    model = _model()
    init_weights(model, "orthogonal", gain)
    g2 = (gain or 1.0) ** 2
    shapes = set()
    for m in _layers(model):
        w = m.weight.flatten(1).double()
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        torch.testing.assert_close(gram, g2 * torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)
        shapes.add(w.shape[0] <= w.shape[1])
    assert shapes == {True, False}  # both cases were exercised
    _biases_zero(model)


def test_default_changes_nothing():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    init_weights(model, "default", None)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_zero3_placeholders_are_refused():
    model = _model()
    placeholder = model[6].weight
    placeholder.data = torch.empty(0)  # what ZeRO-3 leaves outside a gather
    placeholder.ds_id, placeholder.ds_numel = 6, 512 * 256
    with pytest.raises(DistrainError, match=r"^model.init: parameter 6.weight is a DeepSpeed ZeRO-3 placeholder"):
        init_weights(model, "he", None)


@pytest.mark.parametrize("scheme, gain, message", [
    ("he", 2.0, "model.init_gain: 2.0 is set but model.init=he takes its gain from ReLU"),
    ("default", 1.0, "model.init_gain: 1.0 is set but model.init=default changes nothing"),
    ("xavier", 0.0, "model.init_gain: 0.0 must be > 0"),
    ("kaiming", None, "model.init: unknown scheme 'kaiming'"),
])
def test_mistakes_name_the_key(scheme, gain, message):
    with pytest.raises(DistrainError, match="^" + message):
        init_weights(_model(), scheme, gain)
