"""RCS: robustness-aware coreset selection (Xu, Zhang, Liu, Sugiyama & Kankanhalli, NeurIPS 2023).

Seed 001. After ``W`` warm-up epochs on the whole training set, every ``I`` epochs RCS picks a
coreset ``S``, ``|S| = k |X|``, on which the next ``I`` epochs train. It greedily maximizes

    G(S) = -L_RD(U; theta - eta * grad L_ACL(S; theta))

on an unlabeled validation set ``U``, with the representational distance
``L_RD(U) = sum_{x in U} KL( softmax(h(x)) || softmax(h(x~)) )``, ``x~`` the PGD maximizer of that
KL in the ``eps`` ball (``h = g o f``). Each greedy step adds the unit whose ACL gradient ``q_k``
best matches the current validation gradient ``q_U`` (``argmax_k q_k . q_U``), then moves
``theta' <- theta' - eta q_k`` and recomputes ``q_U`` at ``theta'``.

What we do, as the authors' code does: gradients are taken with respect to the last linear layer
of the projection head only (its input features are cached, so recomputing ``q_U`` after each
greedy step costs one small matrix product), and the units scored are mini-batches of
``unit`` training samples (the global batch by default) rather than single samples
(``unit = 1`` scores samples). Units are a fresh seeded partition of the training set at each
selection. The last chosen unit is trimmed so the coreset has exactly ``round(k |X|)`` samples.

Distribution: each worker scores its share of the units and of ``U``; the gradients and features
are gathered, and every worker runs the (deterministic) greedy search on the same data, so all
workers hold the same coreset without another broadcast. ``gather`` is passed in (identity on
one process).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from rayrcm.attacks.pgd import PGDConfig, pgd

Gather = Callable[[torch.Tensor], torch.Tensor]  # (n, ...) per worker -> (world * n, ...) in rank order


def coreset_size(n: int, fraction: float) -> int:
    return max(1, int(round(fraction * n)))


def greedy_select(unit_grads: torch.Tensor, val_grad: Callable[[torch.Tensor], torch.Tensor], n_units: int,
                  lr: float) -> list[int]:
    """Indices of ``n_units`` rows of ``unit_grads`` ``(M, P)``, chosen one at a time by
    ``argmax_k q_k . val_grad(delta)`` with ``delta <- delta - lr * q_k`` after each choice
    (``val_grad(delta)`` is the validation gradient at ``theta + delta``). Ties go to the lower index."""
    m = unit_grads.shape[0]
    if not 0 < n_units <= m:
        raise ValueError(f"cannot select {n_units} of {m} units")
    delta = torch.zeros(unit_grads.shape[1], dtype=unit_grads.dtype, device=unit_grads.device)
    free = torch.ones(m, dtype=torch.bool, device=unit_grads.device)
    chosen: list[int] = []
    for _ in range(n_units):
        scores = (unit_grads @ val_grad(delta)).masked_fill(~free, float("-inf"))
        k = int(torch.argmax(scores))
        chosen.append(k)
        free[k] = False
        delta = delta - lr * unit_grads[k]
    return chosen


class RDGradient:
    """``grad_W L_RD`` at ``W + delta`` for the last linear layer ``(W, b)`` of the projector, from
    cached inputs of that layer for natural ``a_nat`` and adversarial ``a_adv`` images ``(N, H)``."""

    def __init__(self, a_nat: torch.Tensor, a_adv: torch.Tensor, layer: nn.Linear) -> None:
        self.a_nat, self.a_adv = a_nat.detach().float(), a_adv.detach().float()
        self.weight = layer.weight.detach().float()
        self.bias = None if layer.bias is None else layer.bias.detach().float()

    def loss(self, weight: torch.Tensor) -> torch.Tensor:
        p = F.log_softmax(F.linear(self.a_nat, weight, self.bias), dim=1)
        q = F.log_softmax(F.linear(self.a_adv, weight, self.bias), dim=1)
        return F.kl_div(q, p, log_target=True, reduction="sum")  # KL(p || q)

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        w = (self.weight + delta.view_as(self.weight)).requires_grad_(True)
        with torch.enable_grad():
            return torch.autograd.grad(self.loss(w), w)[0].flatten()


def _rd_attack(head_in: Callable[[torch.Tensor], torch.Tensor], last: nn.Linear, x: torch.Tensor, attack: PGDConfig) -> torch.Tensor:
    with torch.no_grad():
        p = F.log_softmax(last(head_in(x)).float(), dim=1)

    def kl(xa: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(last(head_in(xa)).float(), dim=1), p, log_target=True, reduction="sum")

    return pgd(kl, [x], attack)[0]


def rd_features(head_in: Callable[[torch.Tensor], torch.Tensor], last: nn.Linear, dataset: Dataset, attack: PGDConfig, *,
                device: torch.device | str, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of the projector's last layer for ``dataset``'s first view and its RD adversary."""
    nat, adv = [], []
    for views, _ in DataLoader(dataset, batch_size=batch_size):
        x = (views[0] if isinstance(views, (list, tuple)) else views).to(device)
        x_adv = _rd_attack(head_in, last, x, attack)
        with torch.no_grad():
            nat.append(head_in(x).float())
            adv.append(head_in(x_adv).float())
    return torch.cat(nat), torch.cat(adv)


def units_of(n: int, unit: int, seed: int) -> list[list[int]]:
    """A seeded partition of ``range(n)`` into units of ``unit`` samples (the last may be shorter)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [perm[i:i + unit] for i in range(0, n, unit)]


def select_coreset(unit_grad: Callable[[list[int]], torch.Tensor], rd_grad: Callable[[], RDGradient], n: int, *,
                   fraction: float, unit: int, lr: float, seed: int, rank: int = 0, world: int = 1,
                   gather: Gather = lambda t: t) -> list[int]:
    """The RCS coreset of ``range(n)``: exactly ``round(fraction * n)`` distinct sample indices, sorted.

    ``unit_grad(indices)`` returns the flattened ACL gradient of one unit; ``rd_grad()`` the
    validation :class:`RDGradient` (computed by every worker on its share and gathered inside).
    This worker scores units ``rank, rank + world, ...``; ``gather`` joins equal-sized blocks.
    """
    units = units_of(n, unit, seed)
    per_rank = math.ceil(len(units) / world)
    mine = [units[i] for i in range(rank, len(units), world)]
    grads = [unit_grad(u) for u in mine]
    p = grads[0].numel() if grads else 0
    block = torch.zeros(per_rank, max(p, 1))
    for i, g in enumerate(grads):
        block[i] = g.detach().float().cpu()
    allg = gather(block)  # (world * per_rank, P): row r * per_rank + i is unit r + i * world
    order = [r * per_rank + i for i in range(per_rank) for r in range(world) if r + i * world < len(units)]
    ordered = allg[order]
    target = coreset_size(n, fraction)
    sizes = [len(u) for u in units]
    need, total = 0, 0
    for s in sorted(sizes, reverse=True):  # enough units even if the short one is picked
        need, total = need + 1, total + s
        if total >= target:
            break
    chosen = greedy_select(ordered, rd_grad(), need, lr)
    picked: list[int] = []
    for k in chosen:
        picked.extend(units[k])
    return sorted(picked[:target])


def coreset_epochs(epoch: int, warmup: int, interval: int) -> tuple[bool, bool]:
    """``(on the coreset, select now)`` for a zero-based epoch."""
    if epoch < warmup:
        return False, False
    return True, (epoch - warmup) % interval == 0


def epoch_samples(epoch: int, n: int, fraction: float, warmup: int) -> int:
    """Training samples in ``epoch``: all of them during warm-up (or with ``fraction = 1``), else the coreset's."""
    return n if fraction >= 1 or epoch < warmup else coreset_size(n, fraction)


def subset(dataset: Dataset, indices: Sequence[int]) -> Subset:
    return Subset(dataset, list(indices))
