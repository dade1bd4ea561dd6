"""``pgd``: accuracy under L-inf PGD-k (untargeted CE, ``k = pgd_steps``) on the clean images; attack
``pgd<k>``. Each image starts from its own random point, seeded by ``(seed, image index)``, as the
training chain's robust evaluation (:func:`rayrcm.eval.robust.pgd_correct`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rayrcm.attacks.pgd import PGDConfig
from rayrcm.eval.robust import pgd_correct
from rayrcm.eval.suites.base import NONE, Cell, CellContext, ShardSettings, Suite


class PGDSuite(Suite):
    def cells(self, ctx: CellContext) -> list[Cell]:
        return [Cell(ctx.dataset, NONE, 0, False, f"pgd{ctx.cfg.pgd_steps}", "clean")]

    def owns_attack(self, attack: str) -> bool:
        return attack.startswith("pgd")

    def correct(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: Sequence[int],
                settings: ShardSettings) -> torch.Tensor:
        return pgd_correct(model, x, y, indices, PGDConfig.of(settings.budget), settings.seed)


__all__ = ["PGDSuite"]
