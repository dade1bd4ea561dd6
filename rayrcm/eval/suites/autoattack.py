"""``aa`` and ``aa-apgd``: accuracy under Croce & Hein's standard AutoAttack (APGD-CE, APGD-T, FAB-T,
Square: "AutoAttack (standard)") and under its first two attacks ("APGD-CE+APGD-T (upper bound)"),
on the clean images; AutoAttack's draws seeded per batch by ``(seed, first image index)``, so ``aa``
replays ``aa-apgd``'s draws (:func:`rayrcm.eval.robust.autoattack_masks`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rayrcm.eval.robust import autoattack_masks
from rayrcm.eval.suites.base import NONE, Cell, CellContext, ShardSettings, Suite


class AutoAttackSuite(Suite):
    """``attack``: ``aa`` (the standard version) or ``aa-apgd`` (APGD-CE then APGD-T)."""

    def __init__(self, attack: str) -> None:
        self.attack = attack

    def cells(self, ctx: CellContext) -> list[Cell]:
        return [Cell(ctx.dataset, NONE, 0, False, self.attack, "clean")]

    def owns_attack(self, attack: str) -> bool:
        return attack == self.attack

    def correct(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: Sequence[int],
                settings: ShardSettings) -> torch.Tensor:
        s = settings
        return autoattack_masks(model, x, y, indices, seed=s.seed, eps=s.eps, norm=s.norm, aa_iters=s.aa_iters,
                                aa_targets=s.aa_targets, aa_queries=s.aa_queries, standard=self.attack == "aa")[0]


__all__ = ["AutoAttackSuite"]
