"""The CIFAR ResNets of He et al. 2016 (section 4.2): 3 stages of 16/32/64 channels, 6n+2 layers.

Built for 32x32 inputs: a 3x3 stem, no max-pool, stride-2 convolutions between stages and a
1x1-conv projection shortcut when the shape changes (option B). Optional stochastic depth on the
residual branches and dropout before the classifier add no parameters or state-dict keys.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.ops import StochasticDepth

from distrain.models.stochastic_depth import drop_path_rates

NormLayer = Callable[[int], nn.Module]


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: NormLayer, drop_path: float):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.drop_path(out) + identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images.

    Args:
        depth: 20, 32, 44, 56 or 110.
        num_classes: Output classes.
        norm: Builds the norm layer for a channel count (BatchNorm2d by default).
        zero_init_residual: Start each block's last norm gamma at 0 (the block starts as identity).
        drop_path_rate: Stochastic depth: the last block's residual branch is dropped with this
            probability per sample, earlier ones linearly less (the first never).
        dropout: Dropout probability on the pooled features before the classifier.
    """

    def __init__(self, depth: int, num_classes: int, norm: NormLayer = nn.BatchNorm2d, zero_init_residual: bool = False,
                 drop_path_rate: float = 0.0, dropout: float = 0.0):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = norm(16)
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], 16
        rates = iter(drop_path_rates(drop_path_rate, 3 * n))
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(n):
                layers.append(_BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1, norm, next(rates)))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for block in self.layers:
                nn.init.zeros_(block.bn2.weight)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.layers(x)).flatten(1)
        return self.fc(self.dropout(x))
