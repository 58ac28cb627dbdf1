"""Transfer modes on real models and optimizers: blocks, layer decay, linear probes, gradual unfreezing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from conftest import torchrun_script
from test_plan_schedule import cfg_with
from torch import nn

from distrain.config import OptimConfig, TransferConfig
from distrain.errors import DistrainError
from distrain.models.cifar_resnet import CifarResNet
from distrain.optim import create_optimizer, param_groups
from distrain.tricks.transfer import (
    block_ids,
    check_transfer,
    describe_groups,
    drop_frozen_grads,
    freeze_for_linear_probe,
    gradual_train_mode,
    group_lr,
    train_only,
    unfreeze_epochs,
)


def blocks_of(ids: dict[str, int], prefix: str) -> set[int]:
    return {b for name, b in ids.items() if name.startswith(prefix)}


# --- blocks ---------------------------------------------------------------------------------------


def test_blocks_of_a_cifar_resnet():
    ids, n = block_ids(CifarResNet(20, 10))
    assert n == 10  # stem, 9 residual blocks, classifier
    assert blocks_of(ids, "conv1.") == blocks_of(ids, "bn1.") == {0}
    for i in range(9):
        assert blocks_of(ids, f"layers.{i}.") == {i + 1}
    assert blocks_of(ids, "fc.") == {10}


def test_blocks_of_a_torchvision_resnet_are_its_stages():
    ids, n = block_ids(torchvision.models.resnet18(weights=None, num_classes=10))
    assert n == 5
    assert [blocks_of(ids, p) for p in ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.", "fc.")] == [
        {0}, {0}, {1}, {2}, {3}, {4}, {5}]


def test_blocks_of_a_timm_vit_follow_its_group_matcher():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32)
    ids, n = block_ids(model)
    assert n == 13  # embeddings, 12 transformer blocks (the final norm with the last), head
    assert {ids["cls_token"], ids["pos_embed"]} | blocks_of(ids, "patch_embed.") == {0}
    assert [blocks_of(ids, f"blocks.{i}.") for i in range(12)] == [{i + 1} for i in range(12)]
    assert blocks_of(ids, "norm.") == {12} and blocks_of(ids, "head.") == {13}


def test_generic_blocks_follow_top_level_children_with_the_classifier_alone_last():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.token = nn.Parameter(torch.zeros(4))
            self.stem = nn.Conv2d(3, 4, 3)
            self.features = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
            self.head = nn.Sequential(nn.Linear(4, 4), nn.Dropout(), nn.Linear(4, 2))

    ids, n = block_ids(Net())
    assert ids == {"token": 0, "stem.weight": 0, "stem.bias": 0, "features.0.weight": 1, "features.0.bias": 1,
                   "features.2.weight": 2, "features.2.bias": 2, "head.0.weight": 3, "head.0.bias": 3,
                   "head.2.weight": 4, "head.2.bias": 4}
    assert n == 4
    with pytest.raises(DistrainError, match="classifier"):
        block_ids(nn.Sequential(nn.Conv2d(3, 4, 3)))


# --- layer decay and the head LR ------------------------------------------------------------------


def test_group_lr_scales_follow_layer_decay_and_the_head_scale():
    model = CifarResNet(20, 10)
    ids, n = block_ids(model)
    groups = param_groups(model, 1e-4, False, layer_decay=0.5, head_lr_scale=10.0)
    assert len(groups) == 2 * (n + 1)  # decayed and not, per block
    group_of = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = group_of[id(p)]
        assert g["lr_scale"] == 0.5 ** (n - ids[name]) * (10.0 if name.startswith("fc.") else 1.0), name
        assert g["unfreeze_epoch"] == 0.0
        assert g["weight_decay"] == (0.0 if p.ndim == 1 else 1e-4), name
    assert [g["lr_scale"] for g in groups] == sorted(g["lr_scale"] for g in groups)  # from the stem up
    opt = create_optimizer(model, OptimConfig(layer_decay=0.5, head_lr_scale=10.0), lr=0.2)
    assert [g["lr"] for g in opt.param_groups] == [0.2 * g["lr_scale"] for g in opt.param_groups]


def test_defaults_keep_the_two_groups():
    groups = param_groups(CifarResNet(8, 10), 1e-4, False)
    assert [(g["weight_decay"], g["lr_scale"], g["unfreeze_epoch"]) for g in groups] == [(1e-4, 1.0, 0.0),
                                                                                        (0.0, 1.0, 0.0)]


def test_group_lr_is_zero_before_a_group_unfreezes():
    model = CifarResNet(8, 10)  # stem, 3 residual blocks, classifier: n = 4
    groups = param_groups(model, 1e-4, False, layer_decay=0.5, unfreeze_every=0.1)
    since = {g["unfreeze_epoch"] for g in groups}
    assert since == {0.0, 0.1, 0.2, 0.1 * 3, 0.4}  # 0.1 * 3 is 0.30000000000000004
    for g in groups:
        for epoch in (0.0, 0.05, 0.1, 0.2, 3 / 10, 0.4, 7.0):
            expected = 0.0 if epoch < round(g["unfreeze_epoch"], 6) else 0.3 * g["lr_scale"]
            assert group_lr(g, 0.3, epoch) == expected, (g["unfreeze_epoch"], epoch)
    assert group_lr({"params": []}, 0.3, 0.0) == 0.3  # a group built elsewhere


# --- linear probe ---------------------------------------------------------------------------------


def test_linear_probe_trains_the_classifier_alone_on_frozen_statistics():
    torch.manual_seed(0)
    model = CifarResNet(8, 10)
    heads = freeze_for_linear_probe(model)
    assert heads == [model.fc]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    wrapper = nn.Sequential(model)  # stands in for the DDP wrapper
    model.eval()
    train_only(wrapper, model, heads)
    assert wrapper.training and [n for n, m in model.named_modules() if m.training] == ["fc"]
    opt = create_optimizer(model, OptimConfig(name="sgd", momentum=0.9, weight_decay=1e-3, head_lr_scale=2.0), lr=0.1)
    assert {g["lr"] for g in opt.param_groups} == {0.2}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nn.functional.cross_entropy(wrapper(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"fc.weight", "fc.bias"}  # running statistics included: unchanged


# --- gradual unfreezing ---------------------------------------------------------------------------


def _step(model: nn.Module, wrapper: nn.Module, opt, unfreeze, epoch: float, drop: bool) -> None:
    gradual_train_mode(wrapper, unfreeze, epoch)
    for g in opt.param_groups:
        g["lr"] = group_lr(g, 0.05, epoch)
    nn.functional.cross_entropy(wrapper(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3])).backward()
    if drop:
        drop_frozen_grads(opt, epoch)
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars", "lamb"])
@pytest.mark.parametrize("drop", [True, False], ids=["dropped", "lr0-only"])
def test_gradual_unfreezing_holds_frozen_blocks_bit_identical(name, drop):
    torch.manual_seed(0)
    model = CifarResNet(8, 10)  # blocks: stem 0, layers.0-2 1-3, fc 4
    wrapper = nn.Sequential(model)
    cfg = OptimConfig(name=name, momentum=0.9, weight_decay=0.05, layer_decay=0.8)
    opt = create_optimizer(model, cfg, lr=0.05, transfer=TransferConfig(mode="gradual", unfreeze_every=1.0))
    unfreeze = unfreeze_epochs(model, 1.0)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def moved() -> set[str]:
        return {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("layers") else "")
                for k, v in model.state_dict().items() if not torch.equal(v, start[k])}

    for epoch in (0.0, 0.5, 0.75):
        _step(model, wrapper, opt, unfreeze, epoch, drop)
    assert moved() == {"fc"}  # weights, decay and BN statistics of the frozen blocks untouched
    frozen = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    # Dropped gradients: no momentum or Adam moments. LR 0 alone (DeepSpeed) lets them accumulate.
    assert all(not opt.state[p] for p in frozen) == drop
    _step(model, wrapper, opt, unfreeze, 1.0, drop)
    assert moved() == {"fc", "layers.2"}
    if name == "lamb" and drop:
        # The first update of the unfrozen group is LAMB's step 1, as for a group trained from the start.
        assert [int(g["step"]) for g in opt.param_groups if g["unfreeze_epoch"] == 1.0] == [1, 1]
    for epoch in (2.0, 3.0, 4.0):
        _step(model, wrapper, opt, unfreeze, epoch, drop)
    assert moved() == {"fc", "layers.2", "layers.1", "layers.0", "conv1", "bn1"}


def test_modules_unfreeze_with_their_block():
    model = CifarResNet(8, 10)
    model.layers[1].extra = nn.Dropout()  # no parameters: follows its residual block
    unfreeze = unfreeze_epochs(model, 0.5)
    by_name = {name: unfreeze[m] for name, m in model.named_modules()}
    assert by_name[""] == 0.0 and by_name["fc"] == 0.0 and by_name["pool"] == 0.0
    assert by_name["layers"] == 0.5  # a container unfreezes with its highest block
    assert by_name["layers.1"] == by_name["layers.1.bn2"] == by_name["layers.1.extra"] == 1.0
    assert by_name["conv1"] == by_name["bn1"] == 2.0
    wrapper = nn.Sequential(model)
    gradual_train_mode(wrapper, unfreeze, 0.99)
    assert wrapper.training and model.training and model.layers[2].bn1.training
    assert not model.layers[1].bn1.training and not model.layers[1].extra.training and not model.bn1.training


DDP_SCRIPT = """
import json, sys
import torch, torch.distributed as dist
from torch import nn
from distrain.config import OptimConfig, TransferConfig
from distrain.models.cifar_resnet import CifarResNet
from distrain.optim import create_optimizer
from distrain.tricks.transfer import drop_frozen_grads, gradual_train_mode, group_lr, unfreeze_epochs

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = CifarResNet(8, 10)
unfreeze = unfreeze_epochs(model, 1.0)
opt = create_optimizer(model, OptimConfig(momentum=0.9, weight_decay=1e-3), 0.1,
                       TransferConfig(mode="gradual", unfreeze_every=1.0))
ddp = nn.parallel.DistributedDataParallel(model)
start = {n: p.detach().clone() for n, p in model.named_parameters()}
buffers = {n: b.clone() for n, b in model.named_buffers()}
data = torch.Generator().manual_seed(rank)
first_move = {}
for update in range(6):  # 2 updates per epoch: the head, then layers.2 (epoch 1), then layers.1 (epoch 2)
    epoch = update / 2
    gradual_train_mode(ddp, unfreeze, epoch)
    for g in opt.param_groups:
        g["lr"] = group_lr(g, 0.1, epoch)
    x, y = torch.randn(4, 3, 16, 16, generator=data), torch.randint(0, 10, (4,), generator=data)
    nn.functional.cross_entropy(ddp(x), y).backward()
    drop_frozen_grads(opt, epoch)
    opt.step()
    opt.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        if not torch.equal(p, start[n]):
            first_move.setdefault(n.split(".")[0] + (n[6:8] if n.startswith("layers") else ""), update)
# Buffers of training BN layers follow each rank's own batches (the loop syncs them before use).
out = {"params": {n: p.double().sum().item() for n, p in model.named_parameters()}, "moved": first_move,
       "frozen_stats": all(torch.equal(b, buffers[n]) for n, b in model.named_buffers()
                           if n.startswith(("bn1", "layers.0"))),
       "all_require_grad": all(p.requires_grad for p in model.parameters())}
json.dump(out, open(f"rank{rank}.json", "w"))
dist.destroy_process_group()
"""


@pytest.mark.dist
def test_gradual_unfreezing_under_ddp_needs_no_rebuild_and_keeps_replicas_equal(tmp_path: Path):
    torchrun_script(tmp_path, "gradual.py", DDP_SCRIPT)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1  # same weights on both ranks
    assert rank0["moved"] == {"fc": 0, "layers.2": 2, "layers.1": 4}  # stem and layers.0 still frozen
    assert rank0["frozen_stats"] and rank0["all_require_grad"]


# --- plan printout and config checks -------------------------------------------------------------


def test_describe_groups_on_the_meta_device():
    with torch.device("meta"):
        model = torchvision.models.resnet18(weights=None, num_classes=10)
    lines = describe_groups(model, OptimConfig(layer_decay=0.75), TransferConfig(mode="gradual"), 0.1)
    assert lines[3] == "block 3/5 (layer3.*): LR x0.5625 (peak 0.05625), unfreezes at epoch 2"
    assert lines[0].startswith("block 0/5 (conv1.*, bn1.*)") and lines[5].endswith("trains from the start")
    assert describe_groups(model, OptimConfig(head_lr_scale=10), TransferConfig(), 0.1) == [
        "blocks 0-4/5 (conv1.*, bn1.*, layer1.*, ... (3 more)): LR x1 (peak 0.1)", "block 5/5 (fc.*): LR x10 (peak 1)"]
    (probe,) = describe_groups(model, OptimConfig(), TransferConfig(mode="linear_probe"), 0.1)
    assert probe.startswith("linear probe: only the classifier (fc.*) trains, LR x1 (peak 0.1); 11,176,512 other")
    assert describe_groups(model, OptimConfig(), TransferConfig(), 0.1) == []


@pytest.mark.parametrize(("sections", "message"), [
    ({"optim": {"layer_decay": 0.0}}, "optim.layer_decay: must be in"),
    ({"optim": {"layer_decay": 1.5}}, "optim.layer_decay: must be in"),
    ({"optim": {"head_lr_scale": 0.0}}, "optim.head_lr_scale: must be > 0"),
    ({"transfer": {"unfreeze_every": 0.0}}, "transfer.unfreeze_every: must be > 0"),
    ({"optim": {"layer_decay": 0.75}, "transfer": {"mode": "linear_probe"}},
     "optim.layer_decay: 0.75 means nothing under transfer.mode=linear_probe"),
    ({"model": {"name": "cifar_resnet20", "dropout": 0.2}, "transfer": {"mode": "linear_probe"}},
     "model.dropout: 0.2 does nothing under transfer.mode=linear_probe"),
])
def test_check_transfer_refuses(sections, message):
    with pytest.raises(DistrainError, match=message):  # from the config's own validation, once it calls this
        check_transfer(cfg_with(**sections))


def test_check_transfer_allows_probing_and_unfreezing_without_pretrained_weights():
    check_transfer(cfg_with(transfer={"mode": "linear_probe"}))
    check_transfer(cfg_with(transfer={"mode": "gradual"}, optim={"layer_decay": 0.7},
                            distributed={"backend": "deepspeed"}))


@pytest.mark.dist
@pytest.mark.slow
def test_a_pretrain_then_gradual_fine_tune_chain_on_two_ranks(tmp_path, digits):
    """Phases, pretrained start, layer decay, gradual unfreezing and early stopping inside `distrain
    train` on 2 gloo ranks: frozen blocks leave the phase bit-identical (weights and BN statistics)."""
    from conftest import checked, distrain
    from safetensors.torch import load_file
    from test_train import recipe

    phases = [{"name": "pre", "schedule": {"epochs": 1}},
              {"name": "tune", "schedule": {"epochs": 3, "warmup_epochs": 0},
               "optim": {"layer_decay": 0.8, "head_lr_scale": 2.0},
               # The head trains from epoch 0, layers.8 from epoch 1.5 (mid-epoch), the rest never.
               "transfer": {"mode": "gradual", "unfreeze_every": 1.5},
               # min_delta 100: only the first evaluation improves; the second stops the phase.
               "early_stopping": {"patience": 1, "min_delta": 100}}]
    cfg = recipe(tmp_path, digits, phases=phases, batch={"per_device": 16, "accumulation": 1},
                 train={"log_every": 10}, distributed={"timeout_s": 120})
    proc = checked(distrain(["train", cfg], cwd=tmp_path, nproc=2))
    run = tmp_path / "run"
    assert "done pre phase" in proc.stdout and "done tune phase" in proc.stdout
    tune = json.loads((run / "tune" / "summary.json").read_text())
    assert tune["world_size"] == 2 and tune["epoch"] == 2 and tune["updates"] == 88  # stopped before epoch 3
    assert tune["stopped_early"].startswith("early stop: eval/top1")
    a, b = tune["replica_fingerprints"]
    assert a == b
    start, end = load_file(run / "pre" / "model.safetensors"), load_file(run / "tune" / "model.safetensors")
    moved = {k for k in start if not torch.equal(start[k], end[k])}
    assert {"fc.weight", "fc.bias", "layers.8.conv2.weight", "layers.8.bn2.running_mean"} <= moved
    assert all(k.startswith(("fc.", "layers.8.")) for k in moved), sorted(moved)


@pytest.mark.slow
def test_gradual_unfreezing_with_layer_decay_resumes_exactly(tmp_path, digits):
    """Stopped between two unfreezings and resumed: the same weights as without the stop (the
    schedule is a function of the epoch; frozen blocks' dropped gradients leave no optimizer state)."""
    from conftest import checked, distrain
    from safetensors.torch import load_file
    from test_train import recipe

    sections = dict(data={"train_crop": 8, "eval_resize": 8, "eval_crop": 8}, eval={"every_epochs": 5},
                    batch={"per_device": 32, "accumulation": 1}, schedule={"epochs": 1, "warmup_epochs": 0},
                    optim={"layer_decay": 0.7, "head_lr_scale": 3.0},
                    transfer={"mode": "gradual", "unfreeze_every": 0.1})  # a block every 4.4 updates
    runs = {}
    for name, max_updates in (("full", 0), ("stopped", 20)):
        (tmp_path / name).mkdir()
        cfg = recipe(tmp_path / name, digits, train={"max_updates": max_updates, "log_every": 11}, **sections)
        checked(distrain(["train", cfg], cwd=tmp_path / name))
        runs[name] = cfg
    checked(distrain(["train", runs["stopped"], "--resume", "auto", "train.max_updates=0"], cwd=tmp_path / "stopped"))
    full = load_file(tmp_path / "full" / "run" / "model.safetensors")
    resumed = load_file(tmp_path / "stopped" / "run" / "model.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
