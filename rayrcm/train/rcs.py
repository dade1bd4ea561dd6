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

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from rayrcm.attacks.pgd import PGDConfig, pgd
from rayrcm.errors import ConfigError

if TYPE_CHECKING:
    from rayrcm.objectives.base import EpochContext

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


def selection_epoch(epoch: int, warmup: int, interval: int) -> int | None:
    """The epoch whose coreset ``epoch`` trains on (itself when it selects), or None during warm-up."""
    if epoch < warmup:
        return None
    return warmup + (epoch - warmup) // interval * interval


class CoresetSchedule:
    """``schedule(epoch)`` -> the coreset indices epoch ``epoch`` trains on, or None (warm-up).

    A method (:class:`~rayrcm.objectives.acl.ACLObjective`) provides ``rcs_unit_gradient``,
    ``rcs_head_in`` and ``rcs_last_layer``; ``cfg`` its config (``rcs_*`` fields, ``attack()``).
    Each selection is kept as ``<folder>/coreset_epoch_<e>.json`` (rank 0 writes it), so a resumed
    run trains on the coreset it had. Collectives are passed in: ``gather`` (see
    :func:`select_coreset`) and ``agree(indices) -> indices`` (rank 0's choice everywhere).
    """

    def __init__(self, objective: nn.Module, cfg: object, train_set: Dataset, val_set: Dataset, folder: Path, *,
                 unit: int, lr: float, seed: int, device: torch.device | str, rank: int = 0, world: int = 1,
                 gather: Gather = lambda t: t, agree: Callable[[list[int]], list[int]] = lambda i: i) -> None:
        self.objective, self.cfg, self.train_set, self.val_set, self.folder = objective, cfg, train_set, val_set, folder
        self.unit, self.lr, self.seed, self.device, self.rank, self.world = unit, lr, seed, device, rank, world
        self.gather, self.agree = gather, agree
        self.selected: tuple[int, float] | None = None  # (epoch, seconds) of the selection the last call made
        self.announce: tuple[Callable[[str], None], Callable[[int, dict[str, float]], None]] | None = None
        self.barrier: Callable[[], None] = lambda: None

    def _unit_grad(self, indices: list[int]) -> torch.Tensor:
        views, y = zip(*(self.train_set[i] for i in indices))
        batch = [torch.stack([v[j] for v in views]).to(self.device) for j in range(len(views[0]))]
        return self.objective.rcs_unit_gradient(batch, torch.tensor(y, device=self.device)).cpu()

    def _rd_grad(self) -> RDGradient:
        last = self.objective.rcs_last_layer()
        a_nat, a_adv = rd_features(self.objective.rcs_head_in, last, self.val_set, self.cfg.attack(), device=self.device)
        return RDGradient(a_nat, a_adv, last)

    @classmethod
    def for_context(cls, objective: nn.Module, cfg: Any, ctx: EpochContext) -> CoresetSchedule:
        """The schedule of a training run: RD loss on (the first ``rcs_val_images`` of) the
        validation split, units of ``rcs_unit`` samples (default: the global batch), greedy step
        ``rcs_lr`` (default: the optimizer's lr), files in ``<job>/coreset``; rank 0 announces each
        selection and logs its size and time."""
        val = ctx.val_set
        if cfg.rcs_val_images:
            val = torch.utils.data.Subset(val, list(range(min(cfg.rcs_val_images, len(val)))))
        if len(val) == 0:
            raise ConfigError("data.val_fraction", 0, "RCS needs an unlabeled validation split (> 0)")
        schedule = cls(objective, cfg, ctx.train_set, val, Path(ctx.work_dir) / "coreset", unit=cfg.rcs_unit or ctx.batch_size,
                       lr=cfg.rcs_lr or ctx.lr, seed=ctx.seed, device=ctx.device, rank=ctx.rank, world=ctx.world,
                       gather=ctx.comm.gather, agree=ctx.comm.agree)
        schedule.announce, schedule.barrier = (ctx.say, ctx.log), ctx.comm.barrier
        return schedule

    def path(self, epoch: int) -> Path:
        return self.folder / f"coreset_epoch_{epoch:05d}.json"

    def __call__(self, epoch: int) -> list[int] | None:
        cfg, self.selected = self.cfg, None
        chosen_at = selection_epoch(epoch, cfg.rcs_warmup_epochs, cfg.rcs_interval_epochs)
        if chosen_at is None:
            return None
        path = self.path(chosen_at)
        if path.is_file():
            return json.loads(path.read_text())["indices"]
        tic = time.perf_counter()
        torch.manual_seed(self.seed * 1_000_003 + chosen_at)  # the same attack starts on every worker
        n = len(self.train_set)  # type: ignore[arg-type]
        indices = select_coreset(self._unit_grad, self._rd_grad, n, fraction=cfg.rcs_fraction, unit=self.unit, lr=self.lr,
                                 seed=self.seed * 7_919 + chosen_at, rank=self.rank, world=self.world, gather=self.gather)
        indices = self.agree(indices)
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"epoch": chosen_at, "fraction": cfg.rcs_fraction, "unit": self.unit, "indices": indices}))
            tmp.replace(path)
        self.selected = (chosen_at, time.perf_counter() - tic)
        if self.announce is not None:
            say, log = self.announce
            took = self.selected[1]
            say(f"[rayrcm] RCS: epoch {chosen_at}: coreset of {len(indices)}/{n} samples selected in {took:.1f} s")
            log(chosen_at, {"rcs_coreset_size": float(len(indices)), "rcs_select_seconds": took})
        self.barrier()  # rank 0 has written the file
        return indices


def epoch_samples(epoch: int, n: int, fraction: float, warmup: int) -> int:
    """Training samples in ``epoch``: all of them during warm-up (or with ``fraction = 1``), else the coreset's."""
    return n if fraction >= 1 or epoch < warmup else coreset_size(n, fraction)
