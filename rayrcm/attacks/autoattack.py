"""The standard AutoAttack: APGD-CE, APGD-T, FAB-T and Square, each on the points still robust.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020 (github.com/fra31/auto-attack), version ``standard``:

==========  ===============================================================================  ==========
attack      settings (Croce & Hein's ``standard``)                                            code
==========  ===============================================================================  ==========
apgd-ce     100 iterations, 1 restart, CE loss                                                ours (:mod:`rayrcm.attacks.apgd`)
apgd-t      100 iterations, 9 target classes (the most likely wrong ones), targeted DLR       ours
fab-t       100 iterations, 9 target classes, 1 restart (no random start),                    torchattacks' ``FAB``
            ``alpha_max=0.1, eta=1.05, beta=0.9``
square      5000 queries, ``p_init=0.8``, 1 restart, margin loss, no schedule rescaling       torchattacks' ``Square``
==========  ===============================================================================  ==========

A clean error counts as broken; every attack runs only on the points that survived the ones before
it, and a point is robust when it survives all four (the worst case over attacks, per point). A
point broken by FAB-T or Square is checked here too: misclassified, within ``eps`` of the clean
image (``norm``) and inside [0, 1]. ``n_iter`` (APGD and FAB) and ``n_targets`` (APGD-T and FAB-T)
are one knob each, as in Croce & Hein's code; ``n_queries`` is Square's.

Two names, used in every table (:data:`LABELS`): ``aa`` is this standard AutoAttack,
``"AutoAttack (standard)"``; ``aa-apgd`` is its first two attacks only
(:func:`rayrcm.attacks.autoattack_robust`), ``"APGD-CE+APGD-T (upper bound)"`` - an upper bound on
the standard number, which it reaches when FAB-T and Square break nothing more.

**Randomness.** APGD's random starts come from torch's global generator, which the caller seeds (the
evaluation job and the end-of-training evaluation alike: per batch, from the run's seed and the batch's
first image index, :func:`rayrcm.eval.robust.batch_seed`). Given the same seed, the
first two stages here draw exactly what :func:`~rayrcm.attacks.autoattack_robust` draws, so on the
same batch ``aa <= aa-apgd`` point by point. FAB-T with one restart draws nothing (deterministic per
point, up to floating-point summation order). Square's seed is drawn from the same global generator
right before it runs; torchattacks (like Croce & Hein's code) shares each iteration's square
position across the batch, so a point's Square outcome - and APGD's random start - depend on the
batch it is in and its position there: results are reproducible for the same seed, batch size and
images (batches cut at fixed image positions), not per image across different batchings. torchattacks reseeds the
global generator inside FAB and Square; that is contained here (``torch.random.fork_rng``), so the
caller's stream continues as if they drew one number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from rayrcm.attacks.apgd import apgd_ce, apgd_targeted
from rayrcm.attacks.pgd import NORMS

STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
LABELS = {"aa": "AutoAttack (standard)", "aa-apgd": "APGD-CE+APGD-T (upper bound)"}
_TA_NORM = {"linf": "Linf", "l2": "L2"}


@dataclass
class AutoAttackResult:
    """Per-point outcome of :func:`standard_autoattack`."""

    robust: torch.Tensor  # (B,) bool: clean-correct and unbroken by every attack
    clean: torch.Tensor  # (B,) bool: correctly classified without an attack
    after: dict[str, torch.Tensor] = field(default_factory=dict)  # attack -> robust mask after it (cumulative)
    attacked: dict[str, int] = field(default_factory=dict)  # attack -> how many points it ran on

    @property
    def upper_bound(self) -> torch.Tensor:
        """Robust after APGD-CE and APGD-T only (the ``aa-apgd`` number of the same draws)."""
        return self.after.get("apgd-t", self.robust)


class _Anchored(nn.Module):
    """The model with a parameter on the input's device: torchattacks reads its device from
    ``model.parameters()``, which a parameter-free model does not have. Same mode as the model."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.anchor = nn.Parameter(torch.zeros(0, device=device), requires_grad=False)
        self.train(model.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.model(x))


def _within(model: nn.Module, x: torch.Tensor, adv: torch.Tensor, y: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Which adversarial points count: misclassified, inside the ``norm`` ball of radius ``eps``
    (relative slack 1e-5 for float rounding) and inside [0, 1]."""
    with torch.no_grad():
        delta = (adv - x).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        finite = torch.isfinite(adv).flatten(1).all(1)
        inside = (adv >= 0).flatten(1).all(1) & (adv <= 1).flatten(1).all(1)
        wrong = model(torch.nan_to_num(adv)).argmax(1) != y
    return cast(torch.Tensor, wrong & finite & inside & (size <= eps * (1 + 1e-5) + 1e-7))


def _devices(x: torch.Tensor) -> list[int]:
    return [x.device.index if x.device.index is not None else torch.cuda.current_device()] if x.is_cuda else []


def fab_targeted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
                 n_iter: int = 100, n_targets: int = 9) -> torch.Tensor:
    """Robust-after-FAB-T mask ``(B,)`` (torchattacks' FAB, ``multi_targeted``: the ``n_targets``
    most likely wrong classes, each on the points still robust; one restart, no random start)."""
    import torchattacks

    with torch.no_grad():
        classes = int(model(x[:1]).shape[1]) if len(x) else 2
    targets = min(n_targets, classes - 1)
    with torch.random.fork_rng(devices=_devices(x)):
        atk = torchattacks.FAB(_Anchored(model, x.device), norm=_TA_NORM[norm], eps=eps, steps=n_iter, n_restarts=1,
                               alpha_max=0.1, eta=1.05, beta=0.9, seed=0, multi_targeted=True,
                               n_classes=targets + 1)
        adv = atk(x, y)
    return ~_within(model, x, adv, y, eps, norm)


def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
           n_queries: int = 5000, seed: int = 0) -> torch.Tensor:
    """Robust-after-Square mask ``(B,)`` (torchattacks' Square: margin loss, ``p_init=0.8``, one
    restart, the schedule not rescaled to ``n_queries``, as in Croce & Hein's AutoAttack)."""
    import torchattacks

    with torch.random.fork_rng(devices=_devices(x)):
        atk = torchattacks.Square(_Anchored(model, x.device), norm=_TA_NORM[norm], eps=eps, n_queries=n_queries,
                                  n_restarts=1, p_init=0.8, loss="margin", resc_schedule=False, seed=seed)
        adv = atk(x, y)
    return ~_within(model, x, adv, y, eps, norm)


def standard_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
                        n_iter: int = 100, n_targets: int = 9, n_queries: int = 5000,
                        attacks: tuple[str, ...] = STANDARD) -> AutoAttackResult:
    """The standard AutoAttack on a batch of [0, 1] images (see the module docstring). ``attacks``
    (default: all four) may name a subset of :data:`STANDARD`; they run in the standard order."""
    if norm not in NORMS:
        raise ValueError(f"norm {norm!r}: choose one of {', '.join(NORMS)}")
    unknown = [a for a in attacks if a not in STANDARD]
    if unknown:
        raise ValueError(f"unknown attack(s) {', '.join(unknown)}; choose from {', '.join(STANDARD)}")
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    robust = clean.clone()
    out = AutoAttackResult(robust, clean.clone())
    for name in (a for a in STANDARD if a in attacks):
        idx = robust.nonzero().flatten()
        out.attacked[name] = len(idx)
        if len(idx):
            xi, yi = x[idx], y[idx]
            if name == "apgd-ce":
                r = apgd_ce(model, xi, yi, eps=eps, norm=norm, n_iter=n_iter)
            elif name == "apgd-t":
                r = apgd_targeted(model, xi, yi, eps=eps, norm=norm, n_iter=n_iter, n_targets=n_targets)
            elif name == "fab-t":
                r = fab_targeted(model, xi, yi, eps=eps, norm=norm, n_iter=n_iter, n_targets=n_targets)
            else:
                seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
                r = square(model, xi, yi, eps=eps, norm=norm, n_queries=n_queries, seed=seed)
            robust[idx] = r.to(robust.device)
        out.after[name] = robust.clone()
    return out


__all__ = ["LABELS", "STANDARD", "AutoAttackResult", "fab_targeted", "square", "standard_autoattack"]
