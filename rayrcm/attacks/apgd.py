"""APGD-CE and APGD-T (targeted DLR): the first two attacks of the standard AutoAttack.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020 (github.com/fra31/auto-attack). Per sample, with budget ``eps``
(pixel units), ``N`` iterations, momentum ``alpha = 0.75`` and step ``eta = 2 eps``:

    z  = P( x_k + eta * sign(grad) )                     (L2: grad / ||grad||_2)
    x_{k+1} = P( x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1}) )      (alpha = 1 at k = 0)

At checkpoints every ``w`` iterations (``w`` starts at ``0.22 N`` and shrinks by ``0.03 N`` to at
least ``0.06 N``) the step of a sample halves and it restarts from its best point when at most
``rho = 0.75`` of the last ``w`` steps raised its loss, or when its step did not halve at the last
checkpoint and its best loss has not improved since (:class:`StepSchedule`, which follows fra31's
``check_oscillation`` to the iteration, including its first checkpoint: there the first step's loss
is compared with 0, not with the starting loss). A sample counts as broken as soon as any iterate is
misclassified.

Losses: CE, and the targeted difference of logits ratio
``DLR_t(z, y) = -(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2)`` (``z_(i)`` the i-th largest logit)
against each of the ``n_targets`` highest non-true classes of the clean input. AutoAttack's
"standard" version runs APGD-CE (100 iterations, 1 restart) then APGD-T (100 iterations, 9 targets)
on the points still robust, then FAB-T and Square (:mod:`rayrcm.attacks.autoattack`);
:func:`autoattack_robust` is its first two attacks only, "APGD-CE+APGD-T (upper bound)" wherever the
number is reported.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from rayrcm.attacks.pgd import _flat_norm, project


def dlr_targeted(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample targeted DLR loss (to maximize); needs at least 4 classes."""
    z = logits.float()
    top = z.sort(dim=1, descending=True).values
    idx = torch.arange(len(y), device=z.device)
    return -(z[idx, y] - z[idx, target]) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def _checkpoint_lengths(n_iter: int) -> tuple[int, int, int]:
    return max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)


class StepSchedule:
    """APGD's per-sample step-size checkpoints, as fra31's ``attack_single_run`` decides them.

    :meth:`update` takes each iteration's loss and the best loss so far and returns, at a checkpoint,
    the mask of samples whose step halves (``None`` between checkpoints). A sample halves when at
    most ``rho * w`` of the last ``w`` steps raised its loss (``check_oscillation``), or when it did
    not halve at the last checkpoint and its best loss has not risen since.

    fra31 counts the rises from a buffer of per-iteration losses that starts at zeros and indexes
    ``x[j - k]`` with negative indices; at the first checkpoint the oldest pair wraps around to the
    buffer's still-unwritten last row, so the first step's loss is compared with 0, not with the
    starting point's loss (CE: nearly always a rise; a correctly classified sample's targeted DLR,
    which is negative: never). This class does the same (``n_iter = 1``: the row read is the
    step's own loss, never a rise).
    """

    def __init__(self, n_iter: int, best_loss: torch.Tensor, rho: float = 0.75) -> None:
        self.w, self.w_min, self.w_decr = _checkpoint_lengths(n_iter)
        self.rho = rho
        self.since_check = 0
        self.increases = torch.zeros_like(best_loss)
        first = 0.0 if n_iter > 1 else float("inf")  # what fra31's wrap-around reads before step 1
        self.prev_loss = torch.full_like(best_loss, first)
        self.loss_at_check = best_loss.clone()
        self.reduced_at_check = torch.ones_like(best_loss, dtype=torch.bool)

    def update(self, loss: torch.Tensor, best_loss: torch.Tensor) -> torch.Tensor | None:
        """One iteration's ``loss`` and the best loss including it; the halving mask at a checkpoint."""
        self.increases += (loss > self.prev_loss).to(self.increases.dtype)
        self.prev_loss = loss.clone()
        self.since_check += 1
        if self.since_check < self.w:
            return None
        oscillating = self.increases <= self.w * self.rho
        stalled = ~self.reduced_at_check & (self.loss_at_check >= best_loss)
        reduce = oscillating | stalled
        self.reduced_at_check, self.loss_at_check = reduce.clone(), best_loss.clone()
        self.since_check, self.increases = 0, torch.zeros_like(self.increases)
        self.w = max(self.w - self.w_decr, self.w_min)
        return reduce


def _step(x: torch.Tensor, x_adv: torch.Tensor, grad: torch.Tensor, eta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    direction = grad.sign() if norm == "linf" else grad / _flat_norm(grad)
    return x + project(x_adv + eta * direction - x, x, eps, norm)


def apgd_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor], *,
             eps: float, norm: str = "linf", n_iter: int = 100, rho: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
    """One APGD run of ``n_iter`` iterations maximizing the per-sample ``loss_fn(logits)``.

    Returns ``(robust, x_adv)``: whether each sample stayed correctly classified at every iterate,
    and an adversarial example for each broken sample (the best-loss point otherwise).
    """
    b = x.shape[0]
    view = (-1,) + (1,) * (x.ndim - 1)
    if norm == "linf":
        t = torch.rand_like(x) * 2 - 1
        start = eps * t / t.flatten(1).abs().amax(1).clamp_min(1e-12).view(view)
    else:
        t = torch.randn_like(x)
        start = eps * t / _flat_norm(t)
    x_adv = x + project(start, x, eps, norm)

    def loss_and_grad(xa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xa = xa.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(xa)
            per = loss_fn(logits)
            g = torch.autograd.grad(per.sum(), xa)[0]
        return per.detach(), g.detach(), logits.detach().argmax(1) == y

    loss, grad, correct = loss_and_grad(x_adv)
    robust = correct.clone()
    x_found = x_adv.clone()  # the adversarial example of a broken sample
    best_loss, x_best, grad_best = loss.clone(), x_adv.clone(), grad.clone()
    eta = torch.full((b, *view[1:]), 2 * eps, device=x.device, dtype=x.dtype)
    schedule = StepSchedule(n_iter, best_loss, rho)
    x_prev = x_adv.clone()
    for k in range(n_iter):
        with torch.no_grad():
            alpha = 0.75 if k > 0 else 1.0
            z = _step(x, x_adv, grad, eta, eps, norm)
            x_new = x + project(x_adv + alpha * (z - x_adv) + (1 - alpha) * (x_adv - x_prev) - x, x, eps, norm)
            x_prev, x_adv = x_adv, x_new
        loss, grad, correct = loss_and_grad(x_adv)
        with torch.no_grad():
            newly = robust & ~correct
            x_found[newly] = x_adv[newly]
            robust &= correct
            better = loss > best_loss
            x_best[better], grad_best[better], best_loss[better] = x_adv[better], grad[better], loss[better]
            reduce = schedule.update(loss, best_loss)
            if reduce is not None:
                eta[reduce] /= 2.0
                x_adv[reduce], grad[reduce] = x_best[reduce], grad_best[reduce]
    x_found[robust] = x_best[robust]
    return robust, x_found


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy (to maximize), in float32."""
    return F.cross_entropy(logits.float(), y, reduction="none")


def apgd_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
            n_iter: int = 100, restarts: int = 1) -> torch.Tensor:
    """Robust-after-APGD-CE mask ``(B,)``; restarts attack only the samples still robust."""
    robust = torch.ones_like(y, dtype=torch.bool)
    for _ in range(restarts):
        idx = robust.nonzero().flatten()
        if len(idx) == 0:
            break
        r, _ = apgd_run(model, x[idx], y[idx], partial(_cross_entropy, y=y[idx]), eps=eps, norm=norm, n_iter=n_iter)
        robust[idx] = r
    return robust


def apgd_targeted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
                  n_iter: int = 100, n_targets: int = 9) -> torch.Tensor:
    """Robust-after-APGD-T mask ``(B,)``: targeted DLR runs against the ``n_targets`` most likely
    wrong classes of the clean input (capped at ``classes - 1``), each on the samples still robust."""
    with torch.no_grad():
        order = model(x).sort(dim=1, descending=True).indices
    if order.shape[1] < 4:
        raise ValueError(f"APGD-T's DLR loss needs at least 4 classes, the model has {order.shape[1]}")
    robust = torch.ones_like(y, dtype=torch.bool)
    for rank in range(1, min(n_targets, order.shape[1] - 1) + 1):
        idx = robust.nonzero().flatten()
        if len(idx) == 0:
            break
        target = order[idx, rank]
        target = torch.where(target == y[idx], order[idx, 0], target)  # misclassified inputs: aim at the top class
        r, _ = apgd_run(model, x[idx], y[idx], partial(dlr_targeted, y=y[idx], target=target), eps=eps, norm=norm,
                        n_iter=n_iter)
        robust[idx] = r
    return robust


def autoattack_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
                      n_iter: int = 100, n_targets: int = 9) -> torch.Tensor:
    """Robust mask under APGD-CE then APGD-T on the survivors (clean errors count as broken)."""
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    idx = robust.nonzero().flatten()
    if len(idx):
        robust[idx] = apgd_ce(model, x[idx], y[idx], eps=eps, norm=norm, n_iter=n_iter)
    idx = robust.nonzero().flatten()
    if len(idx):
        robust[idx] = apgd_targeted(model, x[idx], y[idx], eps=eps, norm=norm, n_iter=n_iter, n_targets=n_targets)
    return cast(torch.Tensor, robust)


__all__ = ["StepSchedule", "apgd_ce", "apgd_run", "apgd_targeted", "autoattack_robust", "dlr_targeted"]
