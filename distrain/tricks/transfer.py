"""Transfer modes: layer-wise LR decay, a head LR, linear probes and gradual unfreezing.

A model is cut into blocks ``0..n`` from the input up: block 0 is the stem (embedding), block
``n`` the classifier alone (:func:`block_ids`). Three things hang off that numbering:

- Layer-wise LR decay (BEiT, MAE) and discriminative LRs: block ``b`` trains at the scheduled LR x
  ``optim.layer_decay ** (n - b)``, the classifier also x ``optim.head_lr_scale``.
- ``transfer.mode=linear_probe``: only the classifier trains; everything else has
  ``requires_grad=False`` before the model is wrapped, and behaves as at test time (BN statistics
  frozen, no dropout or drop-path): a linear classifier on fixed features (Kornblith et al. 2019).
- ``transfer.mode=gradual`` (ULMFiT, Howard & Ruder 2018): the classifier trains from epoch 0,
  block ``b`` from epoch ``(n - b) * transfer.unfreeze_every``. DDP's reducer and DeepSpeed's
  flat partitions are built once, for the parameters that require gradients then, so
  ``requires_grad`` never changes: a frozen block is held by LR 0 in its optimizer groups
  (:func:`group_lr`), its gradients are dropped before the optimizer steps (:func:`drop_frozen_grads`),
  and its layers behave as at test time until it unfreezes (:func:`gradual_train_mode`).

Everything here is a pure function of the config, the model's parameter names and the epoch: no
new state, so a run resumed from a checkpoint unfreezes exactly where the uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
import torchvision
from timm.models import group_parameters
from timm.optim import Lamb
from torch import nn

from distrain.config import Config, OptimConfig, TransferConfig
from distrain.errors import DistrainError
from distrain.models.cifar_resnet import CifarResNet
from distrain.models.pretrained import classifier_names

# Block layouts of model families that lack timm's group_matcher(), in timm's matcher format: a
# regex per group, its captured numbers ordering blocks inside the group; (99999,) joins the
# previous block; unmatched parameters (the head) come last.
_CIFAR_RESNET = {"stem": r"^conv1\.|^bn1\.", "blocks": r"^layers\.(\d+)\."}  # one block per residual block
_RESNET = {"stem": r"^conv1\.|^bn1\.", "blocks": r"^layer(\d+)\."}  # torchvision: one block per stage
_VIT = {  # torchvision: one block per encoder layer, the final norm with the last one (as timm)
    "stem": r"^class_token$|^conv_proj\.|^encoder\.pos_embedding$",
    "blocks": [(r"^encoder\.layers\.encoder_layer_(\d+)\.", None), (r"^encoder\.ln\.", (99999,))],
}
# Epochs closer than this to an unfreezing point count as reaching it: an epoch computed as
# update / updates_per_epoch must not miss (n - b) * unfreeze_every by a rounding error.
_EPOCH_TOLERANCE = 1e-6


def block_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """The block of every parameter of ``model``, from 0 (stem) to ``n`` (the classifier alone).

    timm models are grouped by their own ``group_matcher()`` (as timm's layer decay does: one block
    per transformer block or residual block); torchvision ResNets (ResNeXt, Wide ResNet) as stem,
    ``layer1``..``layer4``, head; torchvision ViTs as stem, one block per encoder layer, head; the
    CIFAR ResNets as stem, one block per residual block (``layers.<i>``), head. Any other model
    falls back to its top-level children in registration order, a top-level ``nn.Sequential`` or
    ``nn.ModuleList`` counting each of its children: coarse (all of a VGG's classifier but the last
    layer is one block, say), but ordered from input to output in the usual way of writing models.
    Parameters of the model itself (class tokens) join block 0. The classifier (see
    :func:`distrain.models.pretrained.classifier_names`) is always block ``n`` on its own.

    Args:
        model: The unwrapped model (any device, ``meta`` included: only names are read).

    Returns:
        (parameter name -> block, n).

    Raises:
        DistrainError: the model has no classifier that can be told.
    """
    head = set(classifier_names(model))
    ids = group_parameters(model, _matcher(model), reverse=True)
    body = sorted({b for name, b in ids.items() if name not in head})
    dense = {b: i for i, b in enumerate(body)}
    n = len(body)
    return {name: n if name in head else dense[b] for name, b in ids.items()}, n


def _matcher(model: nn.Module) -> dict | Callable[[str], int]:
    if hasattr(model, "group_matcher"):  # timm
        return model.group_matcher(coarse=False)
    if isinstance(model, CifarResNet):
        return _CIFAR_RESNET
    if isinstance(model, torchvision.models.ResNet):
        return _RESNET
    if isinstance(model, torchvision.models.VisionTransformer):
        return _VIT
    order: dict[str, int] = {}
    for name, child in model.named_children():
        parts = child.named_children() if isinstance(child, (nn.Sequential, nn.ModuleList)) else [("", child)]
        for sub, module in parts:
            if any(True for _ in module.parameters()):
                order[f"{name}.{sub}" if sub else name] = len(order)

    def ordinal(param: str) -> int:
        first, _, rest = param.partition(".")
        return order.get(f"{first}.{rest.partition('.')[0]}", order.get(first, 0))

    return ordinal


def block_schedule(n: int, layer_decay: float = 1.0, head_lr_scale: float = 1.0,
                   unfreeze_every: float = 0.0) -> list[tuple[float, float]]:
    """The (LR scale, unfreezing epoch) of blocks ``0..n``.

    Block ``b`` trains at LR x ``layer_decay ** (n - b)`` (the classifier, ``b = n``, also x
    ``head_lr_scale``) from epoch ``(n - b) * unfreeze_every`` (0: from the start).
    """
    return [(layer_decay ** (n - b) * (head_lr_scale if b == n else 1.0), (n - b) * unfreeze_every)
            for b in range(n + 1)]


def _frozen(unfreeze_epoch: float, epoch: float) -> bool:
    return epoch < unfreeze_epoch - _EPOCH_TOLERANCE


def group_lr(group: Mapping, lr: float, epoch: float) -> float:
    """The LR of an optimizer param group at ``epoch`` when the schedule's LR is ``lr``.

    Args:
        group: A group of :func:`distrain.optim.param_groups` (its ``lr_scale`` and ``unfreeze_epoch``);
            groups without them (built elsewhere, or loaded from an older checkpoint) train at ``lr``.
        lr: The scheduled LR of the update.
        epoch: The position of the update in epochs (``update / updates_per_epoch``, fractional).

    Returns:
        ``lr x lr_scale``, or 0 while the group's blocks are frozen.
    """
    if _frozen(group.get("unfreeze_epoch", 0.0), epoch):
        return 0.0
    return lr * group.get("lr_scale", 1.0)


def drop_frozen_grads(optimizer: torch.optim.Optimizer, epoch: float) -> None:
    """Drop the gradients of groups still frozen at ``epoch``, so the optimizer skips them.

    Call it after the update's backward, before clipping and ``optimizer.step()`` (DDP or one
    process), with the epoch given to :func:`group_lr`. LR 0 alone already keeps frozen weights
    bit-identical, weight decay included (SGD and LARS scale decay, added to the gradient, by the LR;
    AdamW's decoupled decay is ``1 - lr * wd``; timm's LAMB adds it to the update before scaling by
    the LR); dropping the gradients also keeps momentum and Adam moments from accumulating while
    frozen, so a block starts from fresh optimizer state when it unfreezes, and keeps frozen
    gradients out of the clipped and logged gradient norm. timm's LAMB counts steps per group even
    for groups without gradients; the count restarts here, so a group's first update after
    unfreezing is its step 1 (unless the group was frozen for a single update only: then step 2).

    Not under DeepSpeed, which steps inside ``backward`` over flat partitions that hold every
    gradient: there frozen weights stay put (LR 0; LARS/LAMB are refused under DeepSpeed) but their
    optimizer state accumulates, and the clipped norm includes their gradients. For AdamW that
    changes little: the moments are warm at unfreezing and the first steps keep Adam's size (about
    the LR per weight). For SGD with momentum ``m`` the momentum buffer reaches ``g / (1 - m)`` for a
    steady gradient ``g`` (weight decay included), so the block starts at full momentum speed rather
    than ramping up: relative to a cold start it moves ``lr * g * m / (1 - m)**2`` further over the
    next updates (90 lr g for m = 0.9, about 9 full-speed updates, from gradients of the last ~10
    frozen updates, which a head that trained for ``transfer.unfreeze_every`` epochs already shaped).
    That is the momentum any running block carries, so it is allowed.

    Args:
        optimizer: The optimizer (or Accelerate's wrapper of it) over :func:`distrain.optim.param_groups`.
        epoch: The position of the update in epochs.
    """
    lamb = isinstance(getattr(optimizer, "optimizer", optimizer), Lamb)
    for group in optimizer.param_groups:
        if _frozen(group.get("unfreeze_epoch", 0.0), epoch):
            for p in group["params"]:
                p.grad = None
            if lamb:
                group["step"] = torch.tensor(-1.0)  # Lamb adds 1 before it sees there is nothing to step


def classifier_modules(model: nn.Module) -> list[nn.Module]:
    """The modules holding the classifier's parameters (one, or two for distilled DeiTs).

    Raises:
        DistrainError: the model has no classifier that can be told.
    """
    modules: list[nn.Module] = []
    for name in classifier_names(model):
        module = model.get_submodule(name.rpartition(".")[0])
        if all(module is not m for m in modules):
            modules.append(module)
    return modules


def freeze_all_but(model: nn.Module, modules: Iterable[nn.Module]) -> None:
    """``requires_grad=False`` on every parameter of ``model`` outside ``modules``.

    Call it before the model is wrapped: DDP and DeepSpeed fix the set of trained parameters then.
    """
    model.requires_grad_(False)
    for module in modules:
        module.requires_grad_(True)


def train_only(wrapper: nn.Module, model: nn.Module, modules: Iterable[nn.Module]) -> None:
    """Training mode for ``modules`` only: every other layer of ``model`` (BN statistics, dropout,
    stochastic depth) behaves as at test time.

    Args:
        wrapper: The prepared (e.g. DDP-wrapped) model, which stays in training mode.
        model: The unwrapped model inside it.
        modules: The layers that train.
    """
    wrapper.train()
    keep = {id(m) for m in modules}
    for module in model.modules():  # not .eval(): it recurses, and would reach the kept layers
        module.training = id(module) in keep


def freeze_for_linear_probe(model: nn.Module) -> list[nn.Module]:
    """Freeze everything but the classifier (before wrapping); returns the classifier's modules,
    for :func:`train_only`, which keeps the rest of the model, BN statistics included, as at test time.

    Raises:
        DistrainError: the model has no classifier that can be told.
    """
    heads = classifier_modules(model)
    freeze_all_but(model, heads)
    return heads


def unfreeze_epochs(model: nn.Module, unfreeze_every: float) -> dict[nn.Module, float]:
    """The epoch from which each module of ``model`` trains under gradual unfreezing.

    A module unfreezes with the highest block among its parameters (so containers train as soon as
    any part of them does); a module without parameters (dropout, drop-path, an affine-free norm)
    with the closest module above it that has some. Compute it before wrapping, for
    :func:`gradual_train_mode`.

    Raises:
        DistrainError: the model has no classifier that can be told.
    """
    ids, n = block_ids(model)
    highest: dict[str, int] = {}  # module name -> highest block of the parameters inside it
    for name, block in ids.items():
        parts = name.split(".")
        for depth in range(len(parts)):
            prefix = ".".join(parts[:depth])
            highest[prefix] = max(highest.get(prefix, block), block)
    epochs = {}
    for name, module in model.named_modules():
        while name not in highest:
            name = name.rpartition(".")[0]
        epochs[module] = (n - highest[name]) * unfreeze_every
    return epochs


def gradual_train_mode(wrapper: nn.Module, unfreeze: Mapping[nn.Module, float], epoch: float) -> None:
    """Training mode at ``epoch`` under gradual unfreezing: modules of frozen blocks behave as at test
    time (BN statistics frozen, no dropout or drop-path), the others train.

    Call it whenever the epoch may have crossed an unfreezing point (with ``unfreeze_every`` a
    whole number of epochs, at each epoch start; otherwise before each update: it is a loop over
    the modules setting a flag) and after each evaluation.

    Args:
        wrapper: The prepared (e.g. DDP-wrapped) model.
        unfreeze: What :func:`unfreeze_epochs` returned for the unwrapped model.
        epoch: The position in epochs, as given to :func:`group_lr`.
    """
    wrapper.train()
    for module, since in unfreeze.items():
        module.training = not _frozen(since, epoch)


def describe_groups(model: nn.Module, optim_cfg: OptimConfig, transfer_cfg: TransferConfig,
                    peak_lr: float) -> list[str]:
    """Lines for ``distrain plan``: each block's parameters, LR and unfreezing epoch.

    Args:
        model: The run's model (build it on the ``meta`` device: only names and shapes are read).
        optim_cfg, transfer_cfg: The run's ``optim`` and ``transfer`` sections.
        peak_lr: The schedule's peak LR (``BatchPlan.peak_lr``).

    Returns:
        One line per block (consecutive blocks alike share one), one line for a linear probe, none
        when every parameter trains at the scheduled LR from the start.

    Raises:
        DistrainError: the model has no classifier that can be told.
    """
    gradual = transfer_cfg.mode == "gradual"
    if transfer_cfg.mode == "full" and optim_cfg.layer_decay == 1 and optim_cfg.head_lr_scale == 1:
        return []
    ids, n = block_ids(model)
    names = _block_names(ids)
    if transfer_cfg.mode == "linear_probe":
        frozen = sum(p.numel() for name, p in model.named_parameters() if ids[name] != n)
        scale = optim_cfg.head_lr_scale
        return [f"linear probe: only the classifier ({_shorten(names[n])}) trains, LR x{scale:g} "
                + f"(peak {peak_lr * scale:.4g}); {frozen:,} other weights frozen, BN statistics included"]
    schedule = block_schedule(n, optim_cfg.layer_decay, optim_cfg.head_lr_scale,
                              transfer_cfg.unfreeze_every if gradual else 0.0)
    lines, first = [], 0
    for block, (scale, since) in enumerate(schedule):
        if block < n and schedule[block + 1] == (scale, since):
            continue  # consecutive blocks alike share a line
        what = f"block {block}/{n}" if first == block else f"blocks {first}-{block}/{n}"
        patterns = [pattern for b in range(first, block + 1) for pattern in names[b]]
        line = f"{what} ({_shorten(patterns)}): LR x{scale:.4g} (peak {peak_lr * scale:.4g})"
        if gradual:
            line += f", unfreezes at epoch {since:g}" if since else ", trains from the start"
        lines.append(line)
        first = block + 1
    return lines


def _block_names(ids: dict[str, int]) -> dict[int, list[str]]:
    """Each block's parameters as patterns: the widest module prefix that holds no other block's."""
    blocks_under: dict[str, set[int]] = {}
    for name, block in ids.items():
        parts = name.split(".")
        for depth in range(1, len(parts)):
            blocks_under.setdefault(".".join(parts[:depth]), set()).add(block)
    patterns: dict[int, list[str]] = {}
    for name, block in ids.items():
        parts = name.split(".")
        prefixes = (".".join(parts[:depth]) for depth in range(1, len(parts)))
        prefix = next((p for p in prefixes if blocks_under[p] == {block}), None)
        pattern = name if prefix is None else prefix + ".*"
        if pattern not in patterns.setdefault(block, []):
            patterns[block].append(pattern)
    return patterns


def _shorten(patterns: list[str], shown: int = 3) -> str:
    return ", ".join(patterns[:shown]) + (f", ... ({len(patterns) - shown} more)" if len(patterns) > shown else "")


def check_transfer(cfg: Config) -> None:
    """Config checks of layer decay, the head LR and the transfer mode.

    A linear probe or gradual unfreezing of a randomly initialised model (no ``model.pretrained``)
    is allowed: probing random features is a standard baseline.

    Raises:
        DistrainError: naming the key of the first bad value.
    """
    o, t = cfg.optim, cfg.transfer
    if not 0 < o.layer_decay <= 1:
        raise DistrainError(f"optim.layer_decay: must be in (0, 1], got {o.layer_decay}")
    if not (o.head_lr_scale > 0 and math.isfinite(o.head_lr_scale)):
        raise DistrainError(f"optim.head_lr_scale: must be > 0, got {o.head_lr_scale}")
    if not (t.unfreeze_every > 0 and math.isfinite(t.unfreeze_every)):
        raise DistrainError(f"transfer.unfreeze_every: must be > 0, got {t.unfreeze_every}")
    if t.mode == "linear_probe" and o.layer_decay != 1:
        raise DistrainError(f"optim.layer_decay: {o.layer_decay} means nothing under transfer.mode=linear_probe, "
                            "which trains the classifier alone; set it to 1")
    if t.mode == "linear_probe" and (cfg.model.dropout or cfg.model.drop_path_rate):
        key, value = ("model.dropout", cfg.model.dropout) if cfg.model.dropout else (
            "model.drop_path_rate", cfg.model.drop_path_rate)
        raise DistrainError(f"{key}: {value} does nothing under transfer.mode=linear_probe, which runs everything "
                            "but the classifier as at test time; set it to 0")
