"""Normalisation layers: what counts as one, the batch-independent CNN variants, and ``model.norm``.

``model.norm`` values and what they build:

- ``batch``: the model's own norm layers (BatchNorm for CNNs, LayerNorm for transformers).
- ``sync_batch``: the model's BatchNorm layers synchronised over all ranks' micro-batches
  (GPU runs: torch's SyncBatchNorm has no CPU kernel; see :func:`check_norm_runtime`).
- ``ghost``: the model's ``nn.BatchNorm2d`` layers normalising virtual batches of
  ``model.ghost_batch_size`` samples (:mod:`distrain.models.ghost_bn`).
- ``group`` / ``layer`` / ``instance``: batch-independent GroupNorms built in place of BatchNorm
  by models that take a norm layer (CIFAR ResNets, torchvision and timm ResNets): 32 groups (fewer
  for narrow layers), one group (normalises over C, H, W per sample: the convolutional LayerNorm)
  and one group per channel (affine instance norm, without running statistics).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from distrain.errors import DistrainError
from distrain.models.ghost_bn import GhostBatchNorm2d, convert_to_ghost_bn

# The one definition of "a norm layer" (no weight decay, FixRes adaptation). BatchNorm, SyncBatchNorm,
# ghost BN and InstanceNorm derive from _NormBase; timm's LayerNorm/LayerNorm2d derive from LayerNorm
# and its GroupNorm variants from GroupNorm.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.RMSNorm)


def group_norm(channels: int, **kwargs) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or fewer for narrow layers (Wu & He 2018): batch-independent.

    ``kwargs`` (``device``, ``dtype``, ...) go to :class:`torch.nn.GroupNorm`; timm passes them.
    """
    return nn.GroupNorm(min(32, channels // 4) or 1, channels, **kwargs)


def layer_norm(channels: int, **kwargs) -> nn.GroupNorm:
    """One group: each sample normalised over all of (C, H, W), with a per-channel affine."""
    return nn.GroupNorm(1, channels, **kwargs)


def instance_norm(channels: int, **kwargs) -> nn.GroupNorm:
    """One group per channel: each sample and channel normalised over (H, W), with an affine."""
    return nn.GroupNorm(channels, channels, **kwargs)


# The norm_layer a CNN builder is given for each model.norm that replaces BatchNorm at construction.
NORM_LAYER_BUILDERS = {"group": group_norm, "layer": layer_norm, "instance": instance_norm}


def describe_norms(model: nn.Module) -> str:
    """The class names of ``model``'s norm layers, for messages (``"none"`` without any)."""
    return ", ".join(sorted({type(m).__name__ for m in model.modules() if isinstance(m, NORM_LAYERS)})) or "none"


def convert_norm(model: nn.Module, norm: str, ghost_batch_size: int, name: str, timm_layers: bool) -> nn.Module:
    """Swap ``model``'s BatchNorm layers for ``model.norm: sync_batch`` or ``ghost``; others pass through.

    Args:
        model: A freshly built model; modified in place.
        norm: ``model.norm``.
        ghost_batch_size: ``model.ghost_batch_size`` (``norm: ghost``).
        name: ``model.name``, for messages.
        timm_layers: Use timm's converter, which keeps the activation of its fused BatchNormAct2d.

    Returns:
        The model (a new module only when ``model`` itself is a BatchNorm layer).

    Raises:
        DistrainError: the model has no BatchNorm layers to convert, or (``ghost``) has BatchNorm
            variants ghost BN cannot replace.
    """
    if norm not in ("sync_batch", "ghost"):
        return model
    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        raise DistrainError(
            f"model.norm: {name} has no BatchNorm layers for {norm} (its norm layers: {describe_norms(model)}); "
            "use model.norm=batch (the model's own)"
        )
    if norm == "sync_batch":
        if timm_layers:
            from timm.layers import convert_sync_batchnorm

            return convert_sync_batchnorm(model)
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = convert_to_ghost_bn(model, ghost_batch_size)
    # Subclasses (timm's BatchNormAct2d, BatchNorm1d heads) have forwards ghost BN does not reproduce.
    left = {type(m).__name__ for m in model.modules()
            if isinstance(m, _BatchNorm) and not isinstance(m, GhostBatchNorm2d)}
    if left:
        raise DistrainError(
            f"model.norm: ghost replaces plain BatchNorm2d layers, but {name} also has {', '.join(sorted(left))}; "
            "use model.norm=batch or sync_batch"
        )
    return model


def check_norm_runtime(norm: str, device: torch.device) -> None:
    """Refuse a ``model.norm`` the run's device cannot execute (call once the device is known).

    Raises:
        DistrainError: ``sync_batch`` on a device without a SyncBatchNorm kernel (the CPU).
    """
    if norm == "sync_batch" and device.type not in ("cuda", "xpu", "hpu"):
        raise DistrainError(
            f"model.norm: sync_batch needs GPUs (torch's SyncBatchNorm has no {device.type} kernel); "
            "use batch, or ghost for small-batch statistics"
        )
