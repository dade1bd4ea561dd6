"""Projected gradient ascent (PGD; Madry et al., ICLR 2018) for any loss, with L-inf and L2 budgets.

Given inputs ``x_1..x_m`` (all ``(B, C, H, W)`` in [0, 1]) and a loss ``L(x_1', .., x_m')`` that is a
sum over samples, PGD runs ``T`` steps from ``x' = x + delta_0`` (``delta_0`` uniform in the ball when
``random_start``, else 0):

    L-inf:  x' <- clip_[0,1]( Pi_{||x'-x||_inf <= eps}( x' + rho * sign(grad) ) )
    L2:     x' <- clip_[0,1]( Pi_{||x'-x||_2   <= eps}( x' + rho * grad / ||grad||_2 ) )

with the L2 norm taken per sample. All inputs move together (one loss, one backward per step), so
the same function gives the classifier attack (``m = 1``, CE against the labels) and ACL's
contrastive attack (``m = 2`` views, the contrastive loss of the pair, no labels; Jiang et al.
2020, Kim et al. 2020). Budgets are in [0, 1] pixel units (CIFAR: ``eps = 8/255``, ``rho = 2/255``).

The attack never changes the model's train/eval mode; callers choose it (the authors' ACL attacks
in eval mode with the adversarial BatchNorm; evaluation attacks in eval mode).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from rayrcm.attacks.budget import NORMS, AttackBudget


@dataclass(frozen=True)
class PGDConfig(AttackBudget):
    """An :class:`~rayrcm.attacks.budget.AttackBudget` (norm, eps, step size, steps; ``steps = 0`` means
    no attack) and whether PGD starts at a random point of the ball. Positional order as before:
    ``PGDConfig(norm, eps, step_size, steps, random_start)``."""

    random_start: bool = True

    @classmethod
    def of(cls, budget: AttackBudget, random_start: bool = True) -> PGDConfig:
        """PGD with ``budget``."""
        return cls(budget.norm, budget.eps, budget.step_size, budget.steps, random_start)


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return cast(torch.Tensor, t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.ndim - 1))))


def project(delta: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """``delta`` projected onto the ``eps`` ball, then so that ``x + delta`` stays in [0, 1]."""
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _flat_norm(delta)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0) - x


def random_start(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """A uniform draw from the L-inf ball, or a uniform direction and radius in the L2 ball."""
    if norm == "linf":
        delta = (torch.rand_like(x) * 2 - 1) * eps
    else:
        u = torch.randn_like(x)
        r = torch.rand(x.shape[0], *([1] * (x.ndim - 1)), device=x.device, dtype=x.dtype)
        delta = u / _flat_norm(u) * r * eps
    return project(delta, x, eps, norm)


def pgd(loss_fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], cfg: PGDConfig,
        init: Sequence[torch.Tensor] | None = None, *, project_init: bool = True) -> list[torch.Tensor]:
    """Adversarial versions of ``inputs`` that maximize ``loss_fn(*inputs)`` (a scalar, summed over
    samples so each sample's step does not depend on the batch size). ``init``: starting
    perturbations (default: :func:`random_start` or zero), projected into the ball and the image
    range unless ``project_init=False`` (the RCS authors take the first gradient at the raw start).
    Returns detached tensors."""
    xs = [x.detach() for x in inputs]
    if cfg.steps == 0 or cfg.eps == 0:
        return [x.clone() for x in xs]
    if init is not None:
        deltas = [project(d.detach(), x, cfg.eps, cfg.norm) if project_init else d.detach() for x, d in zip(xs, init)]
    else:
        deltas = [random_start(x, cfg.eps, cfg.norm) if cfg.random_start else torch.zeros_like(x) for x in xs]
    for _ in range(cfg.steps):
        for d in deltas:
            d.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(*[x + d for x, d in zip(xs, deltas)])
            grads = torch.autograd.grad(loss, deltas)
        with torch.no_grad():
            new = []
            for x, d, g in zip(xs, deltas, grads):
                step = g.sign() if cfg.norm == "linf" else g / _flat_norm(g)
                new.append(project(d + cfg.step_size * step, x, cfg.eps, cfg.norm))
            deltas = new
    return [(x + d).detach() for x, d in zip(xs, deltas)]


def pgd_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PGDConfig) -> torch.Tensor:
    """The classifier attack: maximize ``sum_b CE(model(x'_b), y_b)`` (untargeted)."""
    return pgd(lambda xa: F.cross_entropy(model(xa).float(), y, reduction="sum"), [x], cfg)[0]


def pgd_kl(model: nn.Module, x: torch.Tensor, cfg: PGDConfig,
           natural: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """TRADES' inner maximization (Zhang et al., ICML 2019): maximize
    ``sum_b KL( softmax(natural(x_b)) || softmax(model(x'_b)) )``; the start is ``x + 0.001 * N(0, I)``
    as in the authors' code (``cfg.random_start`` is ignored). ``natural`` (default: ``model``) gives
    the reference output, e.g. the natural BatchNorm branch of a dual-BN network."""
    with torch.no_grad():
        p_nat = F.softmax((natural or model)(x).float(), dim=1)

    def loss(xa: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(model(xa).float(), dim=1), p_nat, reduction="sum")

    return pgd(loss, [x], cfg, init=[0.001 * torch.randn_like(x)])[0]


__all__ = ["NORMS", "AttackBudget", "PGDConfig", "pgd", "pgd_ce", "pgd_kl", "project", "random_start"]
