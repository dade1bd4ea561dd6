"""Adversarial attacks in pure torch, batched, on the input's device; budgets in [0, 1] pixel units.

* :class:`AttackBudget`: the one spelling of a budget (norm, eps, step size, steps) with its
  one-line validation; :class:`PGDConfig` is a budget plus PGD's random start.
* :func:`pgd` (any loss, any number of jointly perturbed inputs; L-inf or L2), :func:`pgd_ce`
  (classifier attack), :func:`pgd_kl` (TRADES' inner maximization); ACL's contrastive attack is
  :func:`pgd` on the contrastive loss of a pair of views (see :mod:`rayrcm.objectives.acl`).
* :func:`apgd_ce`, :func:`apgd_targeted`, :func:`autoattack_robust` (APGD-CE + APGD-T, the
  standard AutoAttack's first two attacks: "APGD-CE+APGD-T (upper bound)").
* :func:`standard_autoattack`: Croce & Hein's standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square;
  the last two from torchattacks): "AutoAttack (standard)".
"""

from rayrcm.attacks.apgd import apgd_ce, apgd_run, apgd_targeted, autoattack_robust, dlr_targeted
from rayrcm.attacks.autoattack import AutoAttackResult, standard_autoattack
from rayrcm.attacks.budget import AttackBudget
from rayrcm.attacks.pgd import NORMS, PGDConfig, pgd, pgd_ce, pgd_kl, project, random_start

__all__ = [
    "AttackBudget",
    "AutoAttackResult",
    "NORMS",
    "PGDConfig",
    "apgd_ce",
    "apgd_run",
    "apgd_targeted",
    "autoattack_robust",
    "dlr_targeted",
    "pgd",
    "pgd_ce",
    "pgd_kl",
    "project",
    "random_start",
    "standard_autoattack",
]
