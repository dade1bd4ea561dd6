"""``clean``: accuracy on the job's clean images (attack ``none``)."""

from __future__ import annotations

from rayrcm.eval.suites.base import NONE, Cell, CellContext, Suite


class CleanSuite(Suite):
    def cells(self, ctx: CellContext) -> list[Cell]:
        return [Cell(ctx.dataset, NONE, 0, False, NONE, "clean")]


__all__ = ["CleanSuite"]
