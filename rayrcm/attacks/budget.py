"""The attack budget: the one spelling of an L-inf / L2 ball and the iterations spent in it.

Every place that names a budget uses :class:`AttackBudget`: the PGD attack itself
(:class:`rayrcm.attacks.pgd.PGDConfig` is a budget plus its random start), the training chain's robust
evaluation (:meth:`rayrcm.eval.robust.RobustEvalConfig.budget`), the ``rayrcm evaluate`` job
(:meth:`rayrcm.eval.suites.config.EvaluateConfig.budget`) and its shards
(:meth:`rayrcm.eval.suites.base.ShardSettings.budget`). The configs a user types keep their flat keys
(``eps=...``, ``method.eval_pgd_steps=...``) and hand out the budget as a property.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from rayrcm.errors import ConfigError

NORMS = ("linf", "l2")
B = TypeVar("B", bound="AttackBudget")


@dataclass(frozen=True)
class AttackBudget:
    """An L-inf or L2 budget in [0, 1] pixel units (CIFAR: ``eps = 8/255``, step ``2/255``) and the
    attack's steps (``steps = 0``: no attack, the natural inputs)."""

    norm: str = "linf"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10

    def validate(self: B, key: str = "attack", *, steps: str = "steps") -> B:
        """Itself, or a one-line :class:`~rayrcm.errors.ConfigError` naming ``<key>.<field>`` (``key``
        "" for a flat config; ``steps``: the name of the steps field there, e.g. ``pgd_steps``)."""
        at = f"{key}." if key else ""
        if self.norm not in NORMS:
            raise ConfigError(f"{at}norm", self.norm, f"choose one of: {', '.join(NORMS)}")
        if self.eps < 0:
            raise ConfigError(f"{at}eps", self.eps, "must be >= 0 (pixel units, data in [0, 1])")
        if self.step_size <= 0:
            raise ConfigError(f"{at}step_size", self.step_size, "must be > 0")
        if self.steps < 0:
            raise ConfigError(f"{at}{steps}", self.steps, "must be >= 0 (0 = no attack)")
        return self


__all__ = ["NORMS", "AttackBudget"]
