"""model.drop_path_rate and model.dropout: masks, scaling, rates by depth, seeding, state dicts, and DDP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import torchrun_script
from torch import nn
from torchvision.ops import StochasticDepth

from distrain.config import ModelConfig
from distrain.errors import DistrainError
from distrain.models import check_model, create_meta_model, create_model
from distrain.models.stochastic_depth import DropPathBasicBlock, DropPathBottleneck, drop_path_rates
from distrain.parallel.rng import seed_layers


def build(name: str, num_classes: int = 10, **options) -> nn.Module:
    return create_model(ModelConfig(name=name, **options), num_classes)


def build_meta(name: str, **options) -> nn.Module:
    """The model's structure without its weights (fast for large models)."""
    return create_meta_model(ModelConfig(name=name, **options), 10)


def drop_paths(model: nn.Module) -> list[float]:
    return [m.p for m in model.modules() if isinstance(m, StochasticDepth)]


def binomial_ok(hits: int, n: int, p: float) -> bool:
    """``hits`` of ``n`` within 5 standard deviations of a Binomial(n, p)."""
    return abs(hits - n * p) <= 5 * (n * p * (1 - p)) ** 0.5


# --- the residual branch mask ---------------------------------------------------------------------


def _branch(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(block, DropPathBottleneck):
        out = block.relu(block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x))))))
        return block.bn3(block.conv3(out))
    return block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))


@pytest.mark.parametrize("name, block_of, channels", [
    ("cifar_resnet20", lambda m: m.layers[1], 16),
    ("resnet18", lambda m: m.layer1[-1], 64),
    ("resnet50", lambda m: m.layer1[-1], 256),
])
def test_each_sample_keeps_its_branch_scaled_or_only_its_shortcut(name, block_of, channels):
    torch.manual_seed(0)
    block = block_of(build(name, drop_path_rate=0.4)).train()
    assert block.drop_path.p > 0
    rate = block.drop_path.p = 0.4  # a shallow (cheap) block at the full rate, for a sharp count
    n = 2000
    x = torch.randn(n, channels, 2, 2)
    out = block(x)
    dropped, kept = torch.relu(x), torch.relu(_branch(block, x) / (1 - rate) + x)
    is_dropped = torch.isclose(out, dropped, atol=1e-5).flatten(1).all(1)
    is_kept = torch.isclose(out, kept, atol=1e-4).flatten(1).all(1)
    assert (is_dropped ^ is_kept).all()  # every sample is one or the other, never a mix
    assert binomial_ok(int(is_dropped.sum()), n, rate)
    block.eval()
    assert torch.allclose(block(x), torch.relu(_branch(block, x) + x), atol=1e-5)  # eval: no mask, no scaling


def test_gradient_flows_through_kept_samples_only():
    torch.manual_seed(0)
    layer = build("cifar_resnet20", drop_path_rate=0.5).layers[-1].drop_path.train()
    x = torch.randn(4000, 8, requires_grad=True)
    layer(x).sum().backward()
    kept = (x.grad != 0).all(1)
    assert ((x.grad == 0).all(1) | kept).all()
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 2.0))  # 1 / keep
    assert binomial_ok(int(kept.sum()), 4000, 0.5)


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18"])
def test_a_dropped_branch_still_gives_every_parameter_a_gradient(name):
    # What DDP needs: even with every branch of every sample dropped, no parameter leaves the graph.
    model = build(name, drop_path_rate=0.5).train()
    for m in model.modules():
        if isinstance(m, StochasticDepth):
            m.p = 1.0
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    assert all(p.grad is not None for p in model.parameters())


# --- rates by depth -------------------------------------------------------------------------------


def test_rates_grow_linearly_with_depth_as_in_timm():
    assert drop_path_rates(0.2, 5) == pytest.approx(torch.linspace(0, 0.2, 5).tolist())
    assert drop_path_rates(0.2, 1) == [0.0]
    assert drop_paths(build("cifar_resnet20", drop_path_rate=0.2)) == pytest.approx(torch.linspace(0, 0.2, 9).tolist())
    tv = build("resnet18", drop_path_rate=0.2)
    assert drop_paths(tv) == pytest.approx(torch.linspace(0, 0.2, 8).tolist())
    assert sum(isinstance(m, DropPathBasicBlock) for m in tv.modules()) == 8
    # torchvision's own stochastic-depth layers get the same rule.
    convnext = build_meta("convnext_tiny", drop_path_rate=0.3)
    assert drop_paths(convnext) == pytest.approx(torch.linspace(0, 0.3, 18).tolist())


def test_zero_keeps_the_model_as_built():
    assert drop_paths(build("cifar_resnet20")) == [0.0] * 9
    assert not any(isinstance(m, (DropPathBasicBlock, StochasticDepth)) for m in build("resnet18").modules())
    assert max(drop_paths(build_meta("convnext_tiny"))) == pytest.approx(0.1)  # torchvision's default


def test_models_without_residual_branches_are_refused_by_name():
    with pytest.raises(DistrainError, match=r"^model\.drop_path_rate: vgg11 "):
        check_model(ModelConfig(name="vgg11", drop_path_rate=0.1))
    for bad in (1.0, -0.1):
        with pytest.raises(DistrainError, match=r"^model\.drop_path_rate: a probability"):
            check_model(ModelConfig(name="resnet18", drop_path_rate=bad))
        with pytest.raises(DistrainError, match=r"^model\.dropout: a probability"):
            check_model(ModelConfig(name="resnet18", dropout=bad))


# --- seeding --------------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_masks():
    model = build("cifar_resnet20", drop_path_rate=0.5, dropout=0.3).train()
    x = torch.randn(4, 3, 32, 32)

    def forward(seed: int) -> torch.Tensor:
        seed_layers(torch.device("cpu"), seed)  # what the loop does before each micro-batch
        return model(x)

    first = forward(7)
    assert torch.equal(forward(7), first)
    assert not torch.equal(forward(8), first)


# --- dropout --------------------------------------------------------------------------------------


def _classifier_input(model: nn.Module, classifier: nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen = []
    # Registered after distrain's dropout hook, so it sees the dropped input.
    handle = classifier.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model(x)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("name, path", [("cifar_resnet20", "fc"), ("resnet18", "fc")])
def test_dropout_before_the_classifier_keeps_the_state_dict(name, path):
    torch.manual_seed(0)
    model = build(name, dropout=0.25)
    plain = build(name)
    assert list(model.state_dict()) == list(plain.state_dict())
    model.load_state_dict(plain.state_dict())  # pretrained weights load as into the plain model
    classifier = model.get_submodule(path)
    x = torch.randn(64, 3, 32, 32)
    model.eval()
    clean = _classifier_input(model, classifier, x)
    model.train()
    for m in model.modules():  # BN stays in eval mode: the dropout is then the only change
        m.training = isinstance(m, nn.Dropout)
    dropped = _classifier_input(model, classifier, x)
    zeroed = (dropped == 0) & (clean != 0)  # post-ReLU features: many are 0 already
    assert binomial_ok(int(zeroed.sum()), int((clean != 0).sum()), 0.25)
    assert torch.allclose(dropped[~zeroed], clean[~zeroed] / 0.75, atol=1e-5)


def test_transformers_get_dropout_on_the_head_input_not_in_the_encoder():
    # torchvision's ViT/Swin ``dropout`` argument is an encoder dropout: model.dropout leaves it alone.
    vit, swin = build_meta("vit_b_16", dropout=0.25), build_meta("swin_t", dropout=0.25)
    assert vit.heads.head.input_dropout.p == swin.head.input_dropout.p == 0.25
    assert {m.p for m in vit.encoder.modules() if isinstance(m, nn.Dropout)} == {0.0}


def test_torchvision_classifier_dropouts_go_through_their_own_argument():
    assert build_meta("efficientnet_b0", dropout=0.4).classifier[0].p == pytest.approx(0.4)
    assert build_meta("mobilenet_v3_small", dropout=0.4).classifier[2].p == pytest.approx(0.4)
    assert build_meta("efficientnet_b0").classifier[0].p == pytest.approx(0.2)  # 0 keeps torchvision's default


# --- DDP ------------------------------------------------------------------------------------------

DDP_SCRIPT = """
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from distrain.config import ModelConfig
from distrain.models import create_model
from distrain.parallel.rng import seed_layers

dist.init_process_group("gloo")
rank = dist.get_rank()
for name in ("cifar_resnet20", "resnet18"):
    torch.manual_seed(0)
    model = create_model(ModelConfig(name=name, drop_path_rate=0.9, dropout=0.5), 4)
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(rank)
    # Batches of 2: the last blocks drop their whole batch's branch in most steps. A branch skipped
    # in Python would leave its parameters out of the graph and DDP would raise on the next step.
    for step in range(4):
        seed_layers(torch.device("cpu"), 1000 * rank + step)
        x = torch.randn(2, 3, 16, 16, generator=data)
        loss = F.cross_entropy(ddp(x), torch.randint(0, 4, (2,), generator=data))
        opt.zero_grad()
        loss.backward()
        opt.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    copies = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(copies, flat)
    assert torch.equal(copies[0], copies[1]), name
    print(f"rank {rank} {name} ok", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.dist
def test_drop_path_under_ddp_uses_every_parameter(tmp_path: Path):
    proc = torchrun_script(tmp_path, "ddp_drop_path.py", DDP_SCRIPT)
    for rank in (0, 1):
        for name in ("cifar_resnet20", "resnet18"):
            assert f"rank {rank} {name} ok" in proc.stdout
