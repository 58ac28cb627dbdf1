"""Parameter groups and optimizer construction from the config."""

from __future__ import annotations

import torch
from timm.optim import Lamb, Lars
from torch import nn

from distrain.config import OptimConfig

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def param_groups(model: nn.Module, weight_decay: float, norm_bias_decay: bool) -> list[dict]:
    """Split trainable parameters into a decayed group and a no-decay group.

    Norm-layer parameters and biases go to the no-decay group unless ``norm_bias_decay``: decaying
    BN's gamma/beta only fights the normalisation (Goyal et al. 2017, section 5.1).

    Returns:
        One or two optimizer param-group dicts; empty groups are left out.
    """
    if norm_bias_decay:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for module in model.modules():
        is_norm = isinstance(module, _NORMS)
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (no_decay if is_norm or name == "bias" else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def create_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """Build the optimizer named by ``cfg.name`` over :func:`param_groups` with initial LR ``lr``.

    The loop overwrites every group's LR before each update, so ``lr`` only matters for the first.
    """
    groups = param_groups(model, cfg.weight_decay, cfg.norm_bias_decay)
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
