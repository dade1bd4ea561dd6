"""Projection heads for contrastive pretraining, each as its authors built it.

* :class:`MoCoV3Projector`: the RCM authors' ``rRCMViT._build_mlp`` (jiachenlei/rRCM,
  ``rrcm/vit.py``), itself MoCo v3's: ``layers`` bias-free linear layers with BatchNorm and ReLU
  between them, and an affine-free BatchNorm after the last one when ``last_bn`` (off in RCM).
* :class:`ACLProjector`: the ACL/AIR/RCS authors' ``proj_head`` (GodXuxilie/Enhancing_ACL_via_AIR,
  ``models/resnet_multi_bn.py``): ``fc1 -> bn1 -> relu -> fc2 -> bn2 [-> relu -> fc3 -> bn3]``,
  ``fc1`` with a bias, ``fc2``/``fc3`` without. The authors use ``in = hidden = out`` (512 for
  ResNet-18); the layer names are theirs, so RCS can address ``fc1.weight`` and friends.

Every head maps ``(B, in_dim) -> (B, out_dim)``. BatchNorm statistics are per process; the
training session replaces them with cross-worker BatchNorm when it runs on several workers
(:mod:`rayrcm.models.batchnorm`).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn


class MoCoV3Projector(nn.Module):
    """``Linear(no bias) -> BN -> ReLU`` x ``(layers - 1)``, then ``Linear(no bias)`` [``-> BN(affine=False)``]."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, layers: int = 3, last_bn: bool = False) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers={layers}: need at least one layer")
        mlp: list[nn.Module] = []
        for i in range(layers):
            d_in = in_dim if i == 0 else hidden_dim
            d_out = out_dim if i == layers - 1 else hidden_dim
            mlp.append(nn.Linear(d_in, d_out, bias=False))
            if i < layers - 1:
                mlp += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
            elif last_bn:
                mlp.append(nn.BatchNorm1d(d_out, affine=False))
        self.net = nn.Sequential(*mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.net(x))


class ACLProjector(nn.Module):
    """``fc1 -> bn1 -> relu -> fc2 -> bn2 -> relu -> fc3 -> bn3`` (``two_layer``: stop after ``bn2``)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, two_layer: bool = False) -> None:
        super().__init__()
        self.two_layer = two_layer
        mid = out_dim if two_layer else hidden_dim
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.bn1 = nn.BatchNorm1d(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, mid, bias=False)
        self.bn2 = nn.BatchNorm1d(mid)
        if not two_layer:
            self.fc3 = nn.Linear(hidden_dim, out_dim, bias=False)
            self.bn3 = nn.BatchNorm1d(out_dim)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.fc2(self.relu(self.bn1(self.fc1(x)))))
        if self.two_layer:
            return x
        return cast(torch.Tensor, self.bn3(self.fc3(self.relu(x))))
