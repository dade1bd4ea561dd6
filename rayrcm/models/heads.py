"""Projection heads for contrastive pretraining."""

from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """``Linear(D, hidden) -> GELU -> Linear(hidden, out)``: ``(B, D) -> (B, out)``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BNProjectionHead(nn.Module):
    """SimCLR's projector, as in the ACL/AIR authors' code:
    ``Linear(D, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, out)``: ``(B, D) -> (B, out)``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
