"""CL: SimCLR contrastive learning (Chen, Kornblith, Norouzi & Hinton, ICML 2020), as seed 001 writes it.

    L_CL = CL(h(x^i), h(x^j))        (NT-Xent, temperature 0.5; rayrcm.objectives.contrastive.nt_xent)

over two augmented views of each image, ``h = g o f``. It is ACL's natural term alone
(:mod:`rayrcm.objectives.acl` with ``adversarial=False``: no attack, no adversarial pass; ACL with
``w = -1`` is twice this loss), one code path for CL, ACL and AIR, as the authors run CL with their
ACL script (``pretraining.py --pgd_iter 0 --lambda1 0 --lambda2 0``). Single BatchNorm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rayrcm.objectives.acl import ACLConfig, ACLObjective

if TYPE_CHECKING:
    from rayrcm.sections import Experiment


@dataclass(frozen=True)
class SimCLRConfig(ACLConfig):
    name: str = "simclr"
    adversarial: bool = False
    dual_bn: bool = False
    export_bn: str = "nat"


def build(cfg: Experiment, num_classes: int) -> ACLObjective:
    return ACLObjective(cfg.method, cfg.model, cfg.data.image_size)
