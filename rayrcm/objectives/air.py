"""AIR: adversarial invariant regularization (Xu, Zhang, Liu, Sugiyama & Kankanhalli, NeurIPS 2023).

Seed 001. ACL (:mod:`rayrcm.objectives.acl`) plus two KL invariance terms over the mini-batch ``B``:

    L = L_ACL + lambda1 * L_AIR(B; 0) + lambda2 * L_AIR(B; eps)

    L_AIR(B; eps) = KL( P_i || P_j ; B ) = sum_{k in B} P_i(k) log( P_i(k) / P_j(k) )
    P_u(k) = p_u(y^R | x~_k) * p_u(x~_k | x_k)                                      (u in {i, j})
    p_u(y^R | x~_k) = softmax_k( sim(z(x_k), z(x~^u_k)) / t )       (x_k: the un-augmented image)
    p_u(x~_k | x_k) = softmax_k( sim(z(x~^u_k), z(x^u_k)) / t )

with softmaxes over the batch, cosine ``sim`` and ``t = 0.5``. For ``eps = 0`` the adversarial view
is the natural view itself, ``x~ -> x`` is the identity and ``p_u(x~ | x) = 1``, so
``L_AIR(B; 0) = KL(p_i(y^R | x) || p_j(y^R | x))``. Defaults ``lambda1 = lambda2 = 0.5`` and DynACL's
``w`` schedule, as the authors run AIR (``pretraining.py --DynAug``).

Two choices, stated: ``z`` is the projector output ``g(f(.))`` (the authors' code applies the terms
to the projections; the blog's formula writes ``f``). The KL is the formula's, computed from
log-probabilities; the authors' code passes probabilities where ``F.kl_div`` expects
log-probabilities, which is a different quantity, so values differ from that code.
``lambda1 = lambda2 = 0`` gives ACL exactly.

The batch is the global one: the authors train on 512 images on one GPU, so the softmaxes and the
KL run over all 512. With several workers (``gather``, as for the contrastive negatives) each
worker gathers the per-sample similarities of every worker, with gradient
(:func:`~rayrcm.objectives.contrastive.gather_keys`), and computes the KL of the whole global batch:
every worker's loss value is the one-process value on the concatenated batch, and the averaged
gradient is that value's gradient.

Shapes: ``views = [x^i, x^j, x]``, each ``(B, 3, H, W)`` in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

from rayrcm.errors import ConfigError
from rayrcm.models import bn_route
from rayrcm.objectives.acl import ACLConfig, ACLObjective
from rayrcm.objectives.contrastive import gather_keys

if TYPE_CHECKING:
    from rayrcm.sections import Experiment


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``cos(a_k, b_k)``: ``(B,)``."""
    return (F.normalize(a.float(), dim=1) * F.normalize(b.float(), dim=1)).sum(1)


def _batch_log_softmax(pairs: list[tuple[torch.Tensor, torch.Tensor]], t: float, gather: bool) -> torch.Tensor:
    """``log softmax_k( cos(a_k, b_k) / t )`` over the batch for each pair ``(a, b)``: ``(N, len(pairs))``,
    ``N`` the global batch when ``gather`` (one all-gather for all pairs), else the local one."""
    s = torch.stack([_cos(a, b) for a, b in pairs], dim=1) / t
    if gather:
        s, _ = gather_keys(s)
    return F.log_softmax(s, dim=0)


def kl_batch(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``sum_k p(k) (log p(k) - log q(k))`` for (possibly unnormalized) ``p``, ``q`` over the batch."""
    return (log_p.exp() * (log_p - log_q)).sum()


def air_standard(z_orig: torch.Tensor, zi: torch.Tensor, zj: torch.Tensor, t: float, *, gather: bool = False) -> torch.Tensor:
    """``L_AIR(B; 0) = KL(p_i(y^R|x) || p_j(y^R|x))`` (``gather``: over the global batch)."""
    ls = _batch_log_softmax([(z_orig, zi), (z_orig, zj)], t, gather)
    return kl_batch(ls[:, 0], ls[:, 1])


def air_robust(z_orig: torch.Tensor, zi: torch.Tensor, zj: torch.Tensor, zi_adv: torch.Tensor, zj_adv: torch.Tensor,
               t: float, *, gather: bool = False) -> torch.Tensor:
    """``L_AIR(B; eps) = KL(P_i || P_j)`` with ``log P_u = log p_u(y^R|x~) + log p_u(x~|x)`` (``gather``: global batch)."""
    ls = _batch_log_softmax([(z_orig, zi_adv), (zi_adv, zi), (z_orig, zj_adv), (zj_adv, zj)], t, gather)
    return kl_batch(ls[:, 0] + ls[:, 1], ls[:, 2] + ls[:, 3])


@dataclass(frozen=True)
class AIRConfig(ACLConfig):
    name: str = "air"
    dynamic: bool = True
    lambda1: float = 0.5  # standard invariance (eps = 0)
    lambda2: float = 0.5  # robust invariance (eps)

    def views(self, augmentation: str) -> tuple[str, ...]:
        return (augmentation, augmentation, "none")

    def validate(self, cfg: Experiment) -> None:
        super().validate(cfg)
        for key in ("lambda1", "lambda2"):
            if getattr(self, key) < 0:
                raise ConfigError(f"method.{key}", getattr(self, key), "must be >= 0")


class AIRObjective(ACLObjective):
    cfg: AIRConfig

    def regularizer(self, z: dict[str, torch.Tensor], x_orig: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert x_orig is not None, "AIR needs the un-augmented view (views[2])"
        cfg = self.cfg
        with bn_route(self, "nat"):
            z_orig = self.project(x_orig)
        sir = air_standard(z_orig, z["i"], z["j"], cfg.temperature, gather=self.gather)
        if "i_adv" in z:
            air = air_robust(z_orig, z["i"], z["j"], z["i_adv"], z["j_adv"], cfg.temperature, gather=self.gather)
        else:
            air = torch.zeros((), device=sir.device)
        return cfg.lambda1 * sir + cfg.lambda2 * air, {"air_standard": sir.detach(), "air_robust": air.detach()}


def build(cfg: Experiment, num_classes: int) -> AIRObjective:
    return AIRObjective(cfg.method, cfg.model, cfg.data.image_size)
