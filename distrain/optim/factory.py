"""Parameter groups and optimizer construction from the config."""

from __future__ import annotations

import torch
from timm.optim import Lamb, Lars
from torch import nn

from distrain.config import OptimConfig, TransferConfig
from distrain.models.norms import NORM_LAYERS
from distrain.tricks.transfer import block_ids, block_schedule, group_lr


def param_groups(model: nn.Module, weight_decay: float, norm_bias_decay: bool, layer_decay: float = 1.0,
                 head_lr_scale: float = 1.0, unfreeze_every: float = 0.0) -> list[dict]:
    """Split trainable parameters into groups of equal weight decay, LR scale and unfreezing epoch.

    Norm-layer parameters and biases are not decayed unless ``norm_bias_decay``: decaying BN's
    gamma/beta only fights the normalisation (Goyal et al. 2017, section 5.1). With layer decay, a
    head LR or gradual unfreezing, parameters are also split by block (see
    :func:`distrain.tricks.transfer.block_ids`): block ``b`` of ``n`` gets ``lr_scale``
    ``layer_decay ** (n - b)`` (x ``head_lr_scale`` for the classifier) and ``unfreeze_epoch``
    ``(n - b) * unfreeze_every``; :func:`distrain.tricks.transfer.group_lr` turns these into each
    group's LR.

    Args:
        layer_decay: LR factor per block below the head; 1 is off.
        head_lr_scale: LR factor of the classifier.
        unfreeze_every: Gradual unfreezing: epochs between successive blocks; 0 is off.

    Returns:
        Optimizer param-group dicts (``params``, ``weight_decay``, ``lr_scale``, ``unfreeze_epoch``)
        from the stem up, decayed before not decayed; empty groups are left out.

    Raises:
        DistrainError: blocks are needed and the model has no classifier that can be told.
    """
    blocks, n = block_ids(model) if (layer_decay, head_lr_scale, unfreeze_every) != (1, 1, 0) else ({}, 0)
    schedule = block_schedule(n, layer_decay, head_lr_scale, unfreeze_every)
    entries, seen = [], set()  # (block, not decayed, parameter)
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, NORM_LAYERS)
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:  # a shared parameter joins one group only
                seen.add(id(p))
                block = blocks[f"{module_name}.{name}" if module_name else name] if blocks else 0
                entries.append((block, not norm_bias_decay and (is_norm or name == "bias"), p))
    groups: dict[tuple, dict] = {}
    for block, no_decay, p in sorted(entries, key=lambda e: e[:2]):  # stable: model order within a block
        scale, since = schedule[block]
        group = groups.setdefault((no_decay, scale, since), {
            "params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale, "unfreeze_epoch": since,
        })
        group["params"].append(p)
    return list(groups.values())


def create_optimizer(model: nn.Module, cfg: OptimConfig, lr: float,
                     transfer: TransferConfig | None = None) -> torch.optim.Optimizer:
    """Build the optimizer named by ``cfg.name`` over :func:`param_groups` with scheduled LR ``lr``.

    Each group starts at its LR at epoch 0 (see :func:`distrain.tricks.transfer.group_lr`); the
    loop overwrites them before each update, so ``lr`` only matters for the first.

    Args:
        transfer: The run's transfer settings (``mode=gradual`` splits groups by unfreezing epoch).
    """
    gradual = transfer is not None and transfer.mode == "gradual"
    groups = param_groups(model, cfg.weight_decay, cfg.norm_bias_decay, cfg.layer_decay, cfg.head_lr_scale,
                          transfer.unfreeze_every if gradual else 0.0)
    for group in groups:
        group["lr"] = group_lr(group, lr, 0.0)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
    # timm's LARS/LAMB apply the trust ratio only to groups with weight decay, which is how the
    # papers exclude BN and bias parameters (they sit in the no-decay group).
    if cfg.name == "lars":
        return Lars(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, trust_coeff=cfg.trust_coefficient)
    # distrain clips gradients itself (train.clip_grad_norm); LAMB's own global clipping is off.
    return Lamb(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, max_grad_norm=None)
