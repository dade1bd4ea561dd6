"""The suites of ``rayrcm evaluate`` (pure), one registry line each.

A suite (:class:`~rayrcm.eval.suites.base.Suite`) knows its cells and how a shard of them is
computed; adding one is a module here plus a line below (see :mod:`rayrcm.eval.suites.base`). The
order of registration is the order of :data:`SUITES` in messages.
"""

from __future__ import annotations

from rayrcm.eval.suites import autoattack, clean, corruptions, pgd, shift
from rayrcm.eval.suites.base import Cell, CellContext, Row, ShardSettings, Suite
from rayrcm.registry import Registry


class SuiteRegistry(Registry[Suite]):
    def ordered(self) -> tuple[str, ...]:
        """The names in the order they were registered."""
        return tuple(self._items)

    def of_row(self, row: Row) -> Suite:
        """The suite whose shard ``row`` (or :class:`Cell` fields) is: the first that owns it."""
        for name in self._items:
            if self._items[name].owns(row):
                return self._items[name]
        raise ValueError(f"no evaluate suite owns source {row['source']!r} with attack {row['attack']!r} "
                         f"(suites: {', '.join(self.ordered())})")

    def of_attack(self, attack: str) -> Suite:
        """The first suite whose cells carry ``attack`` (how a batch is scored under it)."""
        for name in self._items:
            if self._items[name].owns_attack(attack):
                return self._items[name]
        raise ValueError(f"unknown attack {attack!r}")


EVALUATE_SUITES = SuiteRegistry("suite")
EVALUATE_SUITES.register("clean")(clean.CleanSuite())  # the job's clean images
EVALUATE_SUITES.register("corruptions")(corruptions.CorruptionSuite())  # generated, CIFAR-C or ImageNet-C at the severities
EVALUATE_SUITES.register("pgd")(pgd.PGDSuite())  # L-inf PGD-k, per-image seeded starts
EVALUATE_SUITES.register("aa-apgd")(autoattack.AutoAttackSuite("aa-apgd"))  # APGD-CE+APGD-T (upper bound)
EVALUATE_SUITES.register("aa")(autoattack.AutoAttackSuite("aa"))  # AutoAttack (standard)
EVALUATE_SUITES.register("shift")(shift.ShiftSuite())  # CIFAR-10.1, ImageNet-Sketch / -R / Stylized

__all__ = ["EVALUATE_SUITES", "Cell", "CellContext", "Row", "ShardSettings", "Suite", "SuiteRegistry"]
