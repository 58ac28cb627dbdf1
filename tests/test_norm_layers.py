"""model.norm: batch-independent GroupNorm variants, ghost and sync BN, and refusals, on real models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from distrain.config import ModelConfig
from distrain.errors import DistrainError
from distrain.models import NORM_LAYERS, check_model, check_norm_runtime, create_model
from distrain.models.ghost_bn import GhostBatchNorm2d
from distrain.models.norms import group_norm, instance_norm, layer_norm


def build(name: str, **options) -> nn.Module:
    return create_model(ModelConfig(name=name, **options), 10)


EXPECTED_GROUPS = {"group": lambda c: min(32, c // 4), "layer": lambda c: 1, "instance": lambda c: c}


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18"])
@pytest.mark.parametrize("norm", ["group", "layer", "instance"])
def test_each_group_norm_replaces_every_batchnorm(name, norm):
    model = build(name, norm=norm)
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == sum(isinstance(m, nn.BatchNorm2d) for m in build(name).modules())
    assert all(m.num_groups == EXPECTED_GROUPS[norm](m.num_channels) and m.affine for m in norms)
    # Batch-independent: a sample's output does not depend on the rest of its batch, in training mode.
    torch.manual_seed(0)
    side = 32 if name.startswith("cifar") else 64  # instance norm needs more than 1x1 at the last stage
    x = torch.randn(3, 3, side, side)
    model.train()
    assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-5)


def test_batch_norm_depends_on_the_batch():
    # The contrast that makes the test above meaningful.
    model = build("cifar_resnet20").train()
    x = torch.randn(3, 3, 32, 32)
    assert not torch.allclose(model(x)[:1], model(x[:2])[:1], atol=1e-3)


def _stats(y: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    return y.mean(dims), y.var(dims, unbiased=False)


def test_what_each_norm_normalises_over():
    torch.manual_seed(0)
    # Channels with very different offsets and scales, per sample.
    x = torch.randn(2, 8, 5, 5) * torch.arange(1, 9).view(1, 8, 1, 1) + torch.arange(8).view(1, 8, 1, 1) * 10
    layer = layer_norm(8)(x)
    mean, var = _stats(layer, (1, 2, 3))
    assert torch.allclose(mean, torch.zeros(2), atol=1e-5) and torch.allclose(var, torch.ones(2), atol=1e-3)
    assert layer.mean((0, 2, 3)).std() > 0.5  # channels keep their relative offsets
    instance = instance_norm(8)(x)
    mean, var = _stats(instance, (2, 3))
    assert torch.allclose(mean, torch.zeros(2, 8), atol=1e-5) and torch.allclose(var, torch.ones(2, 8), atol=1e-3)
    group = group_norm(8)  # 2 groups of 4 channels
    assert group.num_groups == 2
    mean, var = _stats(group(x).view(2, 2, 4, 5, 5), (2, 3, 4))
    assert torch.allclose(mean, torch.zeros(2, 2), atol=1e-5) and torch.allclose(var, torch.ones(2, 2), atol=1e-3)
    # None keeps running statistics: eval mode normalises the same way.
    assert all(not list(m.buffers()) for m in (layer_norm(8), instance_norm(8), group))


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18"])
def test_ghost_converts_every_batchnorm_and_keeps_the_state_dict(name):
    plain = build(name)
    model = build(name, norm="ghost", ghost_batch_size=4)
    ghosts = [m for m in model.modules() if isinstance(m, GhostBatchNorm2d)]
    assert len(ghosts) == sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert all(m.ghost_size == 4 for m in ghosts)
    assert list(model.state_dict()) == list(plain.state_dict())


def test_sync_batch_converts_and_is_refused_on_cpu():
    model = build("resnet18", norm="sync_batch")
    syncs = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(syncs) == sum(isinstance(m, nn.BatchNorm2d) for m in build("resnet18").modules())
    assert list(model.state_dict()) == list(build("resnet18").state_dict())
    with pytest.raises(DistrainError) as e:
        check_norm_runtime("sync_batch", torch.device("cpu"))
    message = str(e.value)
    assert message.startswith("model.norm:") and "sync_batch" in message and "cpu" in message and "\n" not in message
    check_norm_runtime("sync_batch", torch.device("cuda", 0))
    for norm in ("batch", "group", "layer", "instance", "ghost"):
        check_norm_runtime(norm, torch.device("cpu"))


@pytest.mark.parametrize("name, norm, words", [
    ("vgg11", "layer", ["vgg11", "keeps its own norm layers", "model.norm=batch"]),
    ("vit_b_16", "group", ["vit_b_16", "LayerNorm", "model.norm=batch"]),
    ("vit_b_16", "sync_batch", ["vit_b_16", "no BatchNorm layers", "LayerNorm"]),
    ("vgg11", "ghost", ["vgg11", "no BatchNorm layers"]),
])
def test_models_that_cannot_take_the_norm_are_refused_by_name(name, norm, words):
    options = {"norm": norm, "ghost_batch_size": 4 if norm == "ghost" else 0}
    with pytest.raises(DistrainError) as e:
        check_model(ModelConfig(name=name, **options))  # at config time, on the meta device
    message = str(e.value)
    assert message.startswith("model.norm:") and "\n" not in message
    assert all(w in message for w in words), message


def test_ghost_batch_size_goes_with_norm_ghost():
    for options in ({"norm": "ghost"}, {"norm": "batch", "ghost_batch_size": 8},
                    {"norm": "sync_batch", "ghost_batch_size": 8}):
        with pytest.raises(DistrainError, match="^model.ghost_batch_size:"):
            check_model(ModelConfig(name="cifar_resnet20", **options))


def test_norm_layers_is_the_one_definition():
    for layer in (nn.BatchNorm2d(4), nn.SyncBatchNorm(4), GhostBatchNorm2d(4, 2), nn.InstanceNorm2d(4),
                  nn.GroupNorm(2, 4), nn.LayerNorm(4), nn.LocalResponseNorm(2), nn.RMSNorm(4), layer_norm(4),
                  instance_norm(4)):
        assert isinstance(layer, NORM_LAYERS), layer
    assert not isinstance(nn.Linear(2, 2), NORM_LAYERS) and not isinstance(nn.Conv2d(2, 2, 1), NORM_LAYERS)
