"""Ghost batch norm against plain BatchNorm2d: per-chunk equivalence, running statistics, conversion."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.testing import assert_close

from distrain.config import ModelConfig
from distrain.errors import DistrainError
from distrain.models import create_model
from distrain.models.ghost_bn import GhostBatchNorm2d, convert_to_ghost_bn

C = 5


def batch(n: int, channels_last: bool = False, seed: int = 0) -> torch.Tensor:
    """A float64 input with a per-sample offset, so that chunk statistics differ from batch ones."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, C, 6, 4, generator=gen, dtype=torch.float64) * 2
    x = x + torch.randn(n, 1, 1, 1, generator=gen, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    return x.requires_grad_()


def randomize(bn: nn.BatchNorm2d, seed: int = 1) -> nn.BatchNorm2d:
    """Non-trivial affine parameters and running statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
        bn.running_mean.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
    return bn


def backward(y: torch.Tensor) -> None:
    """A loss whose gradient is not constant per channel, so the BN backward is fully exercised."""
    target = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
    (y * target).sum().backward()


def ghost_and_bn(ghost_size: int, **kwargs) -> tuple[GhostBatchNorm2d, nn.BatchNorm2d]:
    ghost = randomize(GhostBatchNorm2d(C, ghost_size, dtype=torch.float64, **kwargs))
    bn = nn.BatchNorm2d(C, dtype=torch.float64, **kwargs)
    bn.load_state_dict(ghost.state_dict())
    return ghost, bn


@pytest.mark.parametrize("ghost_size", [8, 32])
def test_ghost_size_at_least_the_batch_is_batchnorm(ghost_size):
    ghost, bn = ghost_and_bn(ghost_size)
    x, x_ref = batch(8), batch(8)
    for _ in range(2):  # the second forward starts from updated running statistics
        y, y_ref = ghost(x), bn(x_ref)
        assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    backward(y)
    backward(y_ref)
    for a, b in [(x.grad, x_ref.grad), (ghost.weight.grad, bn.weight.grad), (ghost.bias.grad, bn.bias.grad)]:
        assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert_close(ghost.state_dict(), bn.state_dict(), rtol=1e-12, atol=1e-12)


def chunked_bn(ghost: GhostBatchNorm2d, x: torch.Tensor) -> tuple[torch.Tensor, list[nn.BatchNorm2d], nn.Parameter, ...]:
    """Fresh BatchNorm2d modules, one per chunk of ``ghost.ghost_size`` samples, sharing one weight and bias."""
    weight = nn.Parameter(ghost.weight.detach().clone())
    bias = nn.Parameter(ghost.bias.detach().clone())
    bns, outs = [], []
    for chunk in x.split(ghost.ghost_size):
        bn = nn.BatchNorm2d(C, momentum=ghost.momentum, dtype=torch.float64)
        bn.load_state_dict(ghost.state_dict())
        bn.weight, bn.bias = weight, bias
        outs.append(bn(chunk))
        bns.append(bn)
    return torch.cat(outs), bns, weight, bias


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_training_output_and_gradients_equal_bn_per_chunk(channels_last):
    ghost = randomize(GhostBatchNorm2d(C, 4, dtype=torch.float64))
    x, x_ref = batch(12, channels_last), batch(12, channels_last)
    y = ghost(x)
    y_ref, _, weight, bias = chunked_bn(ghost, x_ref)
    assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    backward(y)
    backward(y_ref)
    for a, b in [(x.grad, x_ref.grad), (ghost.weight.grad, weight.grad), (ghost.bias.grad, bias.grad)]:
        assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_running_stats_are_the_average_of_the_chunked_bns():
    """One forward over 3 ghost groups: each chunk's fresh BN (starting from the ghost module's
    running statistics, same momentum) takes one EMA step; the ghost module's running mean and var
    must equal the average of those three results, i.e. one EMA step towards the average of the
    group means and of the group unbiased variances. num_batches_tracked counts one forward."""
    ghost = randomize(GhostBatchNorm2d(C, 4, momentum=0.3, dtype=torch.float64))
    x = batch(12)
    _, bns, _, _ = chunked_bn(ghost, x)
    ghost(x)
    assert_close(ghost.running_mean, torch.stack([bn.running_mean for bn in bns]).mean(0), rtol=1e-12, atol=1e-12)
    assert_close(ghost.running_var, torch.stack([bn.running_var for bn in bns]).mean(0), rtol=1e-12, atol=1e-12)
    assert ghost.num_batches_tracked.item() == 1


def test_momentum_none_is_the_cumulative_average_over_forwards():
    ghost = GhostBatchNorm2d(C, 4, momentum=None, dtype=torch.float64)
    xs = [batch(12, seed=s).detach() for s in range(3)]
    for x in xs:
        ghost(x)
    groups = [x.unflatten(0, (3, 4)) for x in xs]
    # The average of equal-sized group means is the batch mean; variances are averaged per group, unbiased.
    means = torch.stack([x.mean((0, 2, 3)) for x in xs])
    variances = torch.stack([g.var((1, 3, 4), correction=1).mean(0) for g in groups])
    assert_close(ghost.running_mean, means.mean(0), rtol=1e-12, atol=1e-12)
    assert_close(ghost.running_var, variances.mean(0), rtol=1e-12, atol=1e-12)
    assert ghost.num_batches_tracked.item() == 3


def test_eval_uses_running_stats_like_bn():
    ghost, bn = ghost_and_bn(4)
    ghost.eval(), bn.eval()
    x = batch(7)  # eval mode takes any batch size
    assert_close(ghost(x), bn(x), rtol=1e-12, atol=1e-12)
    assert_close(ghost.state_dict(), bn.state_dict(), rtol=0, atol=0)


def test_without_running_stats_eval_uses_ghost_statistics():
    ghost = GhostBatchNorm2d(C, 4, track_running_stats=False, dtype=torch.float64).eval()
    x = batch(8).detach()
    assert_close(ghost(x), torch.cat([nn.functional.batch_norm(c, None, None, training=True) for c in x.split(4)]))


def test_micro_batch_not_a_multiple_of_ghost_size_is_a_user_error():
    ghost = GhostBatchNorm2d(C, 4, dtype=torch.float64)
    with pytest.raises(DistrainError) as err:
        ghost(batch(10))
    message = str(err.value)
    assert "model.ghost_batch_size" in message and "10" in message and "4" in message
    assert "\n" not in message


def test_non_positive_ghost_size_is_rejected():
    with pytest.raises(ValueError, match="ghost_size"):
        GhostBatchNorm2d(C, 0)
    with pytest.raises(ValueError, match="ghost_size"):
        convert_to_ghost_bn(nn.Sequential(nn.BatchNorm2d(C)), -1)


@pytest.mark.parametrize("name", ["resnet18", "cifar_resnet20"])
def test_convert_keeps_state_dict_and_eval_outputs(name):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10) if name == "resnet18" else create_model(ModelConfig(name=name), 10)
    x = torch.randn(8, 3, 32, 32)
    model(x)  # non-trivial running statistics and num_batches_tracked
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_bn = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    model.eval()
    expected = model(x)
    params = [id(p) for p in model.parameters()]

    assert convert_to_ghost_bn(model, 4) is model
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert sum(isinstance(m, GhostBatchNorm2d) and m.ghost_size == 4 for m in model.modules()) == n_bn
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert [id(p) for p in model.parameters()] == params  # an existing optimizer keeps working
    assert_close(model(x), expected)
    model.train()
    out = model(x)
    out.sum().backward()
    assert out.shape == (8, 10) and torch.isfinite(out).all()


def test_convert_carries_settings_and_skips_other_norms():
    shared = nn.BatchNorm2d(C, eps=1e-3, momentum=None, affine=False, track_running_stats=False)
    sync, ghost = nn.SyncBatchNorm(C), GhostBatchNorm2d(C, 2)
    model = nn.Sequential(shared, nn.Sequential(shared), sync, ghost).eval()
    convert_to_ghost_bn(model, 3)
    new = model[0]
    assert isinstance(new, GhostBatchNorm2d) and model[1][0] is new  # sharing survives
    settings = (new.eps, new.momentum, new.affine, new.track_running_stats, new.training)
    assert settings == (1e-3, None, False, False, False)
    assert new.weight is None and new.running_mean is None and new.num_batches_tracked is None
    assert model[2] is sync and model[3] is ghost and ghost.ghost_size == 2
    root = nn.BatchNorm2d(C)
    converted = convert_to_ghost_bn(root, 3)
    assert isinstance(converted, GhostBatchNorm2d) and converted.weight is root.weight


def test_state_dict_round_trips_through_batchnorm():
    """Buffers and parameters only, so DDP broadcasts and checkpoints treat it as a BatchNorm2d."""
    ghost = randomize(GhostBatchNorm2d(C, 4, dtype=torch.float64))
    ghost(batch(8))
    bn = nn.BatchNorm2d(C, dtype=torch.float64)
    bn.load_state_dict(ghost.state_dict(), strict=True)
    back = GhostBatchNorm2d(C, 4, dtype=torch.float64)
    back.load_state_dict(bn.state_dict(), strict=True)
    assert_close(back.state_dict(), ghost.state_dict(), rtol=0, atol=0)


def test_channels_last_bf16_autocast_matches_float32():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), GhostBatchNorm2d(16, 4), nn.ReLU())
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(16, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    expected = net(x)
    expected_stats = net[1].running_mean.clone(), net[1].running_var.clone()
    net.load_state_dict(start)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out.float(), expected, rtol=2e-2, atol=5e-2)
    assert net[1].running_mean.dtype == torch.float32
    assert_close((net[1].running_mean, net[1].running_var), expected_stats, rtol=2e-2, atol=1e-2)
    out.float().sum().backward()
    assert torch.isfinite(net[0].weight.grad).all()
