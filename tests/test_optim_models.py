"""Parameter groups, optimizer construction and the model factory, on real torch modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distrain.config import ModelConfig, OptimConfig, from_dict
from distrain.errors import DistrainError
from distrain.models import create_model, model_names
from distrain.models.norms import group_norm
from distrain.optim import create_optimizer, param_groups


def ids(params) -> set[int]:
    return {id(p) for p in params}


def trainable(model: nn.Module) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def build(name: str, num_classes: int, **options) -> nn.Module:
    return create_model(ModelConfig(name=name, **options), num_classes)


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, bias=True),
        nn.GroupNorm(2, 8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.LayerNorm(8),
        nn.Linear(8, 4),
    )


# --- param_groups ---------------------------------------------------------------------------------


def test_param_groups_split_norm_and_bias():
    m = small_net()
    groups = param_groups(m, weight_decay=5e-4, norm_bias_decay=False)
    assert len(groups) == 2
    decay, no_decay = groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert ids(decay["params"]) == {id(m[0].weight), id(m[3].weight), id(m[8].weight)}
    assert ids(no_decay["params"]) == {
        id(m[1].weight), id(m[1].bias),  # BatchNorm
        id(m[3].bias),  # conv bias
        id(m[4].weight), id(m[4].bias),  # GroupNorm
        id(m[7].weight), id(m[7].bias),  # LayerNorm
        id(m[8].bias),  # linear bias
    }
    assert ids(decay["params"]).isdisjoint(ids(no_decay["params"]))
    assert ids(decay["params"]) | ids(no_decay["params"]) == trainable(m)


def test_param_groups_resnet_counts_add_up():
    m = build("resnet18", 10)
    decay, no_decay = param_groups(m, 1e-4, False)
    n_decay, n_no = len(decay["params"]), len(no_decay["params"])
    assert n_decay + n_no == len(list(m.parameters()))
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == sum(p.numel() for p in m.parameters())
    bn = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    no_ids = ids(no_decay["params"])
    for mod in bn:
        assert id(mod.weight) in no_ids and id(mod.bias) in no_ids
    for name, p in m.named_parameters():
        if name.endswith("bias"):
            assert id(p) in no_ids, name
    assert n_no == 2 * len(bn) + 1  # BN gamma/beta + fc.bias
    assert all(p.dim() > 1 for p in decay["params"])  # only conv/linear weights decay


def test_param_groups_all_in_one_with_norm_bias_decay():
    m = small_net()
    groups = param_groups(m, weight_decay=1e-4, norm_bias_decay=True)
    assert len(groups) == 1
    assert groups[0]["weight_decay"] == 1e-4
    assert ids(groups[0]["params"]) == trainable(m)
    assert len(groups[0]["params"]) == len(list(m.parameters()))


def test_param_groups_skip_frozen_and_empty_groups():
    m = small_net()
    for p in m[1].parameters():
        p.requires_grad_(False)
    groups = param_groups(m, 1e-4, False)
    total = sum(len(g["params"]) for g in groups)
    assert total == len(trainable(m)) == len(list(m.parameters())) - 2
    assert id(m[1].weight) not in ids(p for g in groups for p in g["params"])
    assert len(param_groups(nn.Conv2d(3, 3, 1, bias=False), 1e-4, False)) == 1  # no empty no-decay group
    (only,) = param_groups(nn.BatchNorm2d(3), 1e-4, False)
    assert only["weight_decay"] == 0.0


# --- create_optimizer -----------------------------------------------------------------------------


def test_create_sgd():
    m = small_net()
    cfg = from_dict({"optim": {"name": "sgd", "momentum": 0.8, "nesterov": True, "weight_decay": 1e-3}}).optim
    opt = create_optimizer(m, cfg, lr=0.4)
    assert type(opt) is torch.optim.SGD
    assert len(opt.param_groups) == 2
    for g in opt.param_groups:
        assert g["lr"] == 0.4 and g["momentum"] == 0.8 and g["nesterov"] is True
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 0.0]
    assert ids(p for g in opt.param_groups for p in g["params"]) == trainable(m)


def test_create_adamw():
    m = small_net()
    cfg = OptimConfig(name="adamw", betas=[0.8, 0.95], eps=1e-6, weight_decay=0.05)
    opt = create_optimizer(m, cfg, lr=1e-3)
    assert type(opt) is torch.optim.AdamW
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    for g in opt.param_groups:
        assert g["lr"] == 1e-3 and g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6


def test_create_optimizer_norm_bias_decay_single_group_and_steps():
    m = small_net()
    opt = create_optimizer(m, OptimConfig(norm_bias_decay=True, weight_decay=1e-2), lr=0.1)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 1e-2
    before = m[8].weight.detach().clone()
    m(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    assert not torch.equal(before, m[8].weight)


# --- models ---------------------------------------------------------------------------------------


def test_cifar_resnet20_forward():
    m = build("cifar_resnet20", 10).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d) and mod.kernel_size == (3, 3)]
    assert len(convs) == 19  # 6n+1 3x3 convs + the fc = 20 layers


def test_torchvision_resnet18_num_classes():
    m = build("resnet18", 7).eval()
    assert m.fc.out_features == 7
    with torch.no_grad():
        assert m(torch.randn(1, 3, 64, 64)).shape == (1, 7)


@pytest.mark.parametrize("name, size, classes", [("cifar_resnet20", 32, 10), ("resnet18", 64, 7)])
def test_group_norm_removes_batchnorm(name, size, classes):
    m = build(name, classes, norm="group")
    assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in m.modules())
    gns = [mod for mod in m.modules() if isinstance(mod, nn.GroupNorm)]
    assert gns
    for gn in gns:
        assert gn.num_channels % gn.num_groups == 0
    m.train()
    out = m(torch.randn(1, 3, size, size))  # batch of 1 in train mode: fine without BN
    assert out.shape == (1, classes)


def test_group_norm_group_counts():
    assert group_norm(64).num_groups == 16
    assert group_norm(256).num_groups == 32
    assert group_norm(16).num_groups == 4
    assert group_norm(2).num_groups == 1


def test_unknown_model_suggests():
    with pytest.raises(DistrainError) as e:
        build("resnet51", 10)
    msg = str(e.value)
    assert msg.startswith("model.name:")
    assert "resnet51" in msg and "did you mean" in msg and "resnet50" in msg
    with pytest.raises(DistrainError, match="did you mean.*cifar_resnet20"):
        build("cifar_resnet21", 10)
    # A timm name without its prefix is pointed at it.
    with pytest.raises(DistrainError, match="did you mean.*timm/vit_small_patch16_224"):
        build("vit_small_patch16_224", 10)


def test_group_norm_without_norm_layer_option():
    with pytest.raises(DistrainError) as e:
        build("vgg11", 10, norm="group")
    msg = str(e.value)
    assert msg.startswith("model.norm:") and "vgg11" in msg


def test_model_names():
    names = model_names()
    for n in ("cifar_resnet20", "cifar_resnet110", "resnet18", "resnet50", "vgg11", "timm/vit_small_patch16_224"):
        assert n in names
    assert len(names) == len(set(names))


def test_lars_and_lamb_exclude_no_decay_groups_from_the_trust_ratio():
    from timm.optim import Lamb, Lars

    model = build("cifar_resnet20", 10)
    lars = create_optimizer(model, OptimConfig(name="lars", momentum=0.9, weight_decay=1e-4), lr=1.0)
    lamb = create_optimizer(model, OptimConfig(name="lamb", weight_decay=0.05), lr=1e-3)
    assert isinstance(lars, Lars) and isinstance(lamb, Lamb)
    for opt in (lars, lamb):
        decayed, plain = opt.param_groups
        assert decayed["weight_decay"] > 0 and plain["weight_decay"] == 0.0 and not plain["always_adapt"]
    assert lamb.defaults["max_grad_norm"] is None  # distrain clips; LAMB's own clipping is off
    # One LARS step on a BN weight (no decay group) is plain momentum SGD: no trust ratio.
    bn = model.bn1.weight
    bn.grad = torch.ones_like(bn)
    for p in model.parameters():
        if p is not bn:
            p.grad = torch.zeros_like(p)
    before = bn.detach().clone()
    lars.step()
    assert torch.allclose(bn.detach(), before - 1.0)


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18"])
def test_zero_init_residual_zeroes_the_last_norm_of_each_block(name):
    model = build(name, 10, zero_init_residual=True)
    last_norms = [m.bn2 for m in model.modules() if hasattr(m, "bn2") and not hasattr(m, "bn3")]
    assert last_norms and all((bn.weight == 0).all() for bn in last_norms)
    assert (build(name, 10).bn1.weight != 0).any()
    with pytest.raises(DistrainError, match="zero_init_residual"):
        build("vgg11", 10, zero_init_residual=True)
