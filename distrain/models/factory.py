"""Create a classification model by name."""

from __future__ import annotations

import difflib

import torchvision
from torch import nn

from distrain.errors import DistrainError
from distrain.models.cifar_resnet import CifarResNet

# torchvision families whose builders pass norm_layer through to the network.
_TAKES_NORM_LAYER = ("resnet", "resnext", "wide_resnet")
_CIFAR_DEPTHS = {f"cifar_resnet{d}": d for d in (20, 32, 44, 56, 110)}


def model_names() -> list[str]:
    """Every name :func:`create_model` accepts."""
    return sorted(_CIFAR_DEPTHS) + sorted(torchvision.models.list_models(module=torchvision.models))


def check_model_name(name: str) -> None:
    """Raise DistrainError naming ``model.name`` (and the closest known names) for an unknown model."""
    if name not in model_names():
        close = difflib.get_close_matches(name, model_names(), n=3)
        raise DistrainError(f"model.name: unknown model {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or fewer for narrow layers (Wu & He 2018): batch-independent."""
    return nn.GroupNorm(min(32, channels // 4) or 1, channels)


_NORMS = {"batch": nn.BatchNorm2d, "group": group_norm}


def create_model(name: str, num_classes: int, norm: str = "batch", zero_init_residual: bool = False) -> nn.Module:
    """A randomly initialised classifier.

    Args:
        name: A torchvision classification model (``resnet50``, ``vit_b_16``, ...) or a CIFAR ResNet
            (``cifar_resnet20`` ... ``cifar_resnet110``).
        num_classes: Size of the output layer.
        norm: ``batch`` or ``group`` normalisation, for models that take a norm layer (CIFAR ResNets,
            torchvision ResNets); others keep their own.
        zero_init_residual: Zero the last norm gamma of every residual block (ResNets only).

    Raises:
        DistrainError: unknown name (with the closest known names), or a norm the model cannot take.
    """
    check_model_name(name)
    norm_layer = _NORMS[norm]
    if name in _CIFAR_DEPTHS:
        return CifarResNet(_CIFAR_DEPTHS[name], num_classes, norm_layer, zero_init_residual)
    kwargs = {}
    if zero_init_residual:
        if not name.startswith(_TAKES_NORM_LAYER):
            raise DistrainError(f"model.zero_init_residual: {name} is not a ResNet")
        kwargs["zero_init_residual"] = True
    if norm != "batch":
        if not name.startswith(_TAKES_NORM_LAYER):
            raise DistrainError(f"model.norm: {name} has no norm_layer option; use model.norm=batch")
        kwargs["norm_layer"] = norm_layer
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
