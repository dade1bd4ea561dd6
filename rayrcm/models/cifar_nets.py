"""The CIFAR networks the seeds compare against, which timm does not ship.

* ``cifar_resnet(110)``: He et al. (2016) CIFAR ResNet (3 stages of basic blocks, 16/32/64 wide,
  depth 6n+2), the base classifier of Cohen, Rosenfeld & Kolter (2019).
* ``wide_resnet(28, 10)``: Zagoruyko & Komodakis (2016) WRN-28-10, pre-activation blocks.

Both end in global average pooling and expose ``num_features``.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.nn import functional as F


class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class _PreAct(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.short = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        short = x if self.short is None else self.short(o)
        o = self.conv1(o)
        return cast(torch.Tensor, self.conv2(F.relu(self.bn2(o))) + short)


class _StagedNet(nn.Module):
    def __init__(self, block: type[nn.Module], widths: list[int], n: int, preact: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.stem_bn = None if preact else nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths[1:]):
            for j in range(n):
                layers.append(block(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*layers)
        self.final_bn = nn.BatchNorm2d(cin) if preact else None
        self.num_features = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.stem_bn is not None:
            x = F.relu(self.stem_bn(x))
        x = self.blocks(x)
        if self.final_bn is not None:
            x = F.relu(self.final_bn(x))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def cifar_resnet(depth: int = 110) -> _StagedNet:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth={depth} must be 6n+2")
    return _StagedNet(_Basic, [16, 16, 32, 64], (depth - 2) // 6, preact=False)


def wide_resnet(depth: int = 28, widen: int = 10) -> _StagedNet:
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth={depth} must be 6n+4")
    return _StagedNet(_PreAct, [16, 16 * widen, 32 * widen, 64 * widen], (depth - 4) // 6, preact=True)
