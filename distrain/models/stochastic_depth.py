"""Stochastic depth (Huang et al. 2016) and classifier dropout for models that lack an argument for them.

Drop path multiplies each residual branch's output by a per-sample mask (``mode="row"``), scaled by
1/keep in training and the identity in eval mode. The branch always runs, so every parameter takes
part in every forward and DDP's reducer never waits for a gradient that does not come. Masks come
from the device's default generator (torchvision's :func:`~torchvision.ops.stochastic_depth`),
which the training loop reseeds per rank and micro-batch (:func:`distrain.parallel.rng.seed_layers`).

Rates grow linearly with depth by timm's rule: block ``i`` of ``N`` drops with probability
``rate * i / (N - 1)`` (``torch.linspace(0, rate, N)``), so the first block is never dropped and
the last one with ``rate``.

Neither changes a ``state_dict`` key: pretrained weights load as into the plain model.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops import StochasticDepth


def drop_path_rates(rate: float, blocks: int) -> list[float]:
    """The drop probability of each of ``blocks`` residual blocks, shallowest first: linear from 0 to ``rate``.

    Plain Python (not ``torch.linspace``), so it also works while models are built on the meta device.
    """
    return [rate * i / (blocks - 1) if blocks > 1 else 0.0 for i in range(blocks)]


def set_drop_path_rates(model: nn.Module, rate: float) -> int:
    """Give ``model``'s :class:`~torchvision.ops.StochasticDepth` layers linear-by-depth rates up to ``rate``.

    The layers are taken in registration order, which is depth order in torchvision's ConvNeXt,
    EfficientNet, Swin and MaxViT (MaxViT counts each of its three sub-blocks per layer).

    Returns:
        The number of layers set.
    """
    layers = [m for m in model.modules() if isinstance(m, StochasticDepth)]
    for layer, p in zip(layers, drop_path_rates(rate, len(layers))):
        layer.p = p
    return len(layers)


class DropPathBasicBlock(BasicBlock):
    """torchvision's BasicBlock with a ``drop_path`` on the residual branch (same parameters and forward)."""

    drop_path: StochasticDepth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.drop_path(out) + identity)


class DropPathBottleneck(Bottleneck):
    """torchvision's Bottleneck with a ``drop_path`` on the residual branch (same parameters and forward)."""

    drop_path: StochasticDepth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.drop_path(out) + identity)


_WITH_DROP_PATH = {BasicBlock: DropPathBasicBlock, Bottleneck: DropPathBottleneck}


def add_resnet_drop_path(model: ResNet, rate: float) -> None:
    """Add stochastic depth to every residual block of a torchvision ResNet/ResNeXt/Wide ResNet, in place.

    Each block becomes its drop-path subclass by a class change rather than a rebuild, so torchvision's
    builders stay the one description of each architecture and the blocks keep their parameters
    (and an optimizer built on them); the added layer holds no state.
    """
    blocks = [m for m in model.modules() if type(m) in _WITH_DROP_PATH]
    for block, p in zip(blocks, drop_path_rates(rate, len(blocks))):
        block.__class__ = _WITH_DROP_PATH[type(block)]
        block.drop_path = StochasticDepth(p, "row")


def _drop_input(module: nn.Module, args: tuple) -> tuple:
    return (module.input_dropout(args[0]), *args[1:])


def add_input_dropout(classifier: nn.Module, p: float) -> None:
    """Apply dropout with probability ``p`` to the input of ``classifier``, in place.

    The dropout is a stateless child ``input_dropout`` (visible in the model's repr, switched by
    train/eval) run by a forward pre-hook, so the classifier keeps its name and its ``state_dict``
    keys: a pretrained ``fc.weight`` still loads.
    """
    classifier.input_dropout = nn.Dropout(p)
    classifier.register_forward_pre_hook(_drop_input)
