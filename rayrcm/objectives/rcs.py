"""RCS: robustness-aware coreset selection (Xu, Zhang, Liu, Sugiyama & Kankanhalli, NeurIPS 2023).

Seed 001 and the authors' code (github.com/GodXuxilie/Efficient_ACL_via_RCS,
``ACL_RCS/small_scale_datasets/RCS.py``, ``RCS.update_subset_indice``; line numbers below are
that file's). After ``W`` warm-up epochs on the whole training set, every ``I`` epochs RCS picks a
coreset ``S`` on which the next ``I`` epochs train, greedily lowering the representational
distance (RD) of an unlabeled validation set ``U`` after a one-step update on the units picked.
What is computed, as the authors compute it:

* **Parameters.** Only the projector's linear layers take part: ``fc1.weight``, ``fc1.bias``,
  ``fc2.weight`` and ``fc3.weight`` (their ``'fc' in name`` over ``proj_head``; the BatchNorm
  affines are left out). A gradient *vector* is the concatenation, in that order, of each
  gradient averaged over its dim 0 (``g.mean(dim=0)``: ``(in,)`` for a weight ``(out, in)``, one
  number for the bias; lines 255-261, 294-299). The greedy step uses the full gradients.
* **RD loss** (``kl_loss``, lines 64-80): with ``mm(z) = (z - min_j z) / max_j(z - min_j z)`` per
  row (their in-place ``normalize``), ``q = mm(z_adv) + 1e-8`` and ``p = mm(z_nat) + 1e-8``,
  ``L_RD = mean over all N x D entries of q * (log q - log p)`` (``KLDivLoss(reduction='mean')``),
  ``z = h(x)`` the projector output, natural images on the natural BatchNorm branch, adversarial
  ones on the adversarial branch (lines 250-252).
* **RD attack** (``PGD``, lines 90-125, called with ``iters=Coreset_pgd_iter=3``,
  ``alpha=(10/255)/3``, ``eps=8/255``): uniform start in the ``eps`` ball (not clipped before the
  first step), 3 sign-gradient ascent steps on ``L_RD`` against the natural output, each step
  clipped to the ball and to [0, 1]; the adversarial forward on the adversarial branch.
* **Validation rows** (lines 232-236): each validation batch of ``b`` images is reshaped from
  ``(b, 2, C, H, W)`` to ``(2b, C, H, W)`` and cut to its first ``b`` rows, i.e. the first half
  of the batch's images, each twice (the views are identical, un-augmented images); every copy
  gets its own random start. :func:`rd_rows` gives these rows.
* **Per-unit loss** (lines 274-299): units are shuffled mini-batches of the training set; each
  gets the training attack (contrastive PGD on the adversarial branch), then
  ``(CL(h(x)) + CL(h(x~))) / 2`` with the natural views on the natural branch and the adversarial
  ones on the adversarial branch, encoder features taken without gradient; all in eval mode.
* **Greedy search** (lines 309-366): pick the remaining unit ``k`` maximizing ``q_k . q_U``
  (ties: the first), then (except after the last pick) move the fc parameters by
  ``-lr * grad_k`` (``lr = Coreset_lr = 0.01``) and recompute ``q_U`` at the moved parameters:
  the validation set is attacked again (fresh random starts) and the RD gradient taken there.
  The authors' update runs twice per pick (lines 321-329 update ``linear_layer`` and then
  ``self.model.fc``, which are the same module), so the move is ``2 lr grad_k``; we do the same
  (:data:`STEPS_PER_PICK`). Unit gradients stay those at the original parameters; the model's own
  parameters are not touched (the moved copy lives here and is dropped after the selection).

What we do differently (docs/fidelity.md): the coreset has exactly ``round(k |X|)`` samples (the
last chosen unit is trimmed; the authors keep ``int(k |X| / batch)`` whole units); units are a
seeded partition of the training set and random starts are seeded per unit and per validation
batch, so a selection does not depend on the number of workers; every dataset gets this
(small-scale) algorithm, also ImageNet-32, where the authors' ``ACL_RCS/ImageNet_32/RCS.py``
differs (softmax KL, one attack step, greedy search in blocks of 100 batches).

The lr schedule: the authors' cosine is indexed by epochs, so coreset epochs (fewer steps) move
it as far as whole-set epochs; :class:`rayrcm.train.optim.EpochIndexedSchedule` does that for a per-step
scheduler. When to select and the files each selection is kept in: :mod:`rayrcm.objectives.rcs_schedule`.

Distribution: units are dealt to the workers round-robin and so are validation batches; unit
gradient vectors and validation features are gathered, every worker runs the same greedy search,
and the owner of each chosen unit shares its full gradient (a sum over workers). ``gather`` and
``share`` are passed in (identities on one process).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence, Sized
from typing import Any, Protocol, cast

import torch
from torch import nn
from torch.utils.data import Dataset

from rayrcm.attacks.pgd import PGDConfig, pgd


class RCSMethod(Protocol):
    """What RCS needs of a method (:class:`~rayrcm.objectives.acl.ACLObjective` is one): a module
    with the fc parameters of its projector and the hooks that run them."""

    training: bool

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...
    def eval(self) -> Any: ...
    def train(self, mode: bool = True) -> Any: ...
    def rcs_params(self) -> dict[str, nn.Parameter]: ...
    def rcs_features(self, x: torch.Tensor, route: str) -> torch.Tensor: ...
    def rcs_head(self, features: torch.Tensor, route: str, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor: ...
    def rcs_unit_gradient(self, views: list[torch.Tensor], target: torch.Tensor) -> list[torch.Tensor]: ...


class RCSOptions(Protocol):
    """The ``rcs_*`` settings RCS reads of a method config (:class:`~rayrcm.objectives.acl.ACLConfig`'s)."""

    @property
    def rcs_fraction(self) -> float: ...
    @property
    def rcs_warmup_epochs(self) -> int: ...
    @property
    def rcs_interval_epochs(self) -> int: ...
    @property
    def rcs_unit(self) -> int: ...
    @property
    def rcs_val_images(self) -> int: ...
    @property
    def rcs_lr(self) -> float: ...
    @property
    def rcs_pgd_steps(self) -> int: ...
    @property
    def rcs_eps(self) -> float: ...
    @property
    def rcs_step_size(self) -> float: ...

Gather = Callable[[torch.Tensor], torch.Tensor]  # (n, ...) per worker -> (world * n, ...) in rank order
Share = Callable[[torch.Tensor], torch.Tensor]  # elementwise sum over workers

STEPS_PER_PICK = 2  # the authors apply the greedy step twice per pick (RCS.py:321-329: linear_layer is model.fc)
RD_EPS = 1e-8  # kl_loss's additive constant
RD_TOTAL_STEP = 10 / 255  # the RD attack's step is (10/255) / Coreset_pgd_iter (RCS.py:237)


def mix_seeds(*values: int) -> int:
    h = 0
    for v in values:
        h = (h * 1_000_003 + int(v)) % (2**63 - 1)
    return h


def coreset_size(n: int, fraction: float) -> int:
    return max(1, int(round(fraction * n)))


# ----------------------------------------------------------------------------- the authors' functions


def minmax(z: torch.Tensor) -> torch.Tensor:
    """The authors' ``normalize`` (out of place): ``(z - min) / max(z - min)`` over each row."""
    z = z - z.min(dim=1, keepdim=True)[0]
    return z / z.max(dim=1, keepdim=True)[0]


def rd_loss(z_nat: torch.Tensor, z_adv: torch.Tensor) -> torch.Tensor:
    """The authors' RD loss ``kl_loss(z_adv, z_nat)``: ``KLDivLoss('mean')(log(mm(z_nat) + 1e-8), mm(z_adv) + 1e-8)``."""
    dtype = torch.promote_types(z_adv.dtype, torch.float32)
    q = minmax(z_adv.to(dtype)) + RD_EPS
    log_p = torch.log(minmax(z_nat.to(dtype)) + RD_EPS)
    return (q * (q.log() - log_p)).mean()


def grad_vector(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The authors' gradient vector: each gradient averaged over dim 0, flattened and concatenated."""
    return torch.cat([g.detach().float().mean(dim=0).reshape(-1) for g in grads])


def rd_rows(n: int, batch_size: int) -> list[list[int]]:
    """The validation rows of each batch: ``batch_size`` consecutive images ``i..i+b-1`` give rows
    ``i + r // 2`` for ``r < b`` (the authors' ``view(2b, ...)[:b]`` of two identical views)."""
    return [[start + r // 2 for r in range(min(batch_size, n - start))] for start in range(0, n, batch_size)]


def rd_attack_config(cfg: RCSOptions) -> PGDConfig:
    """The RD attack of ``cfg`` (``rcs_pgd_steps``, ``rcs_eps``, ``rcs_step_size``; step 0 = ``(10/255) / steps``)."""
    steps = cfg.rcs_pgd_steps
    step = cfg.rcs_step_size or (RD_TOTAL_STEP / steps if steps else RD_TOTAL_STEP)
    return PGDConfig("linf", cfg.rcs_eps, step, steps, True)


def rd_attack(x: torch.Tensor, z_nat: torch.Tensor, adv_output: Callable[[torch.Tensor], torch.Tensor],
              attack: PGDConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """The authors' ``PGD`` (RCS.py:90-125) with ``loss_type='KL'``: maximize ``rd_loss(z_nat, adv_output(x'))``
    from a uniform start (not clipped before the first step), drawn on the CPU from ``generator``
    (None: the global RNG, on ``x``'s device, as the authors' ``torch.rand_like``)."""
    if attack.steps == 0 or attack.eps == 0:
        return x.detach().clone()
    x, z_nat, eps = x.detach(), z_nat.detach(), attack.eps
    if generator is None:
        u = torch.rand_like(x)
    else:
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return pgd(lambda xa: rd_loss(z_nat, adv_output(xa)), [x], attack, init=[u * eps * 2 - eps], project_init=False)[0]


def greedy_select(unit_vecs: torch.Tensor, n_units: int, q_val: torch.Tensor,
                  after_pick: Callable[[int], torch.Tensor]) -> list[int]:
    """The authors' greedy search (RCS.py:309-366): ``n_units`` rows of ``unit_vecs`` ``(M, V)``, each
    the argmax of ``q_k . q_val`` over the rows not yet chosen (ties: the lowest index); after each
    pick but the last, ``q_val = after_pick(k)`` (the validation vector after the step on unit ``k``)."""
    m = unit_vecs.shape[0]
    if not 0 < n_units <= m:
        raise ValueError(f"cannot select {n_units} of {m} units")
    free = torch.ones(m, dtype=torch.bool)
    chosen: list[int] = []
    for j in range(n_units):
        gain = (unit_vecs @ q_val.to(unit_vecs)).masked_fill(~free, float("-inf"))
        k = int(torch.argmax(gain))
        chosen.append(k)
        free[k] = False
        if j < n_units - 1:
            q_val = after_pick(k)
    return chosen


# ----------------------------------------------------------------------------- selection


def units_of(n: int, unit: int, seed: int) -> list[list[int]]:
    """A seeded partition of ``range(n)`` into units of ``unit`` samples (the last may be shorter)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [perm[i:i + unit] for i in range(0, n, unit)]


def units_needed(sizes: Sequence[int], target: int) -> int:
    """How many units the greedy search picks: enough for ``target`` samples even if it picks the smallest."""
    need, total = 0, 0
    for s in sorted(sizes, reverse=True):
        need, total = need + 1, total + s
        if total >= target:
            break
    return need


def select_coreset(unit_grad: Callable[[list[int]], Sequence[torch.Tensor]],
                   val_grad: Callable[[list[torch.Tensor], int], torch.Tensor], theta: Sequence[torch.Tensor], n: int, *,
                   fraction: float, unit: int, lr: float, seed: int, rank: int = 0, world: int = 1,
                   gather: Gather = lambda t: t, share: Share = lambda t: t) -> list[int]:
    """The RCS coreset of ``range(n)``: exactly ``round(fraction * n)`` distinct sample indices, sorted.

    ``theta`` are the fc parameters (in the order of the gradient vectors); ``unit_grad(indices)``
    returns the full gradients of one unit's loss w.r.t. them at ``theta``;
    ``val_grad(params, pick)`` the validation gradient vector at ``params`` (a collective: every
    worker calls it the same number of times; ``pick`` counts the updates so far). This worker
    scores units ``rank, rank + world, ...``; ``gather`` joins equal-sized blocks, ``share`` sums
    over workers.
    """
    units = units_of(n, unit, seed)
    theta = [t.detach().float().cpu().clone() for t in theta]
    shapes, numels = [t.shape for t in theta], [t.numel() for t in theta]
    width = grad_vector(theta).numel()
    per_rank = math.ceil(len(units) / world)
    full: dict[int, torch.Tensor] = {}
    block = torch.zeros(per_rank, width)
    for i, k in enumerate(range(rank, len(units), world)):
        grads = [g.detach().float().cpu() for g in unit_grad(units[k])]
        block[i] = grad_vector(grads)
        full[k] = torch.cat([g.reshape(-1) for g in grads])
    allv = gather(block)  # (world * per_rank, V): row r * per_rank + i is unit r + i * world
    order = [(k % world) * per_rank + k // world for k in range(len(units))]
    vecs = allv[order].float()
    target = coreset_size(n, fraction)
    picks = 0

    def after_pick(k: int) -> torch.Tensor:
        nonlocal picks
        flat = share(full[k] if k in full else torch.zeros(sum(numels)))  # the owner's gradient, everywhere
        grads = [g.view(s) for g, s in zip(flat.float().cpu().split(numels), shapes)]
        for _ in range(STEPS_PER_PICK):
            for i, g in enumerate(grads):
                theta[i] = theta[i] - lr * g
        picks += 1
        return val_grad(theta, picks).float().cpu()

    chosen = greedy_select(vecs, units_needed([len(u) for u in units], target), val_grad(theta, 0).float().cpu(), after_pick)
    picked: list[int] = []
    for k in chosen:
        picked.extend(units[k])
    return sorted(picked[:target])


def _first_view(item: Any) -> torch.Tensor:
    views = item[0] if isinstance(item, (list, tuple)) else item
    return cast(torch.Tensor, views[0] if isinstance(views, (list, tuple)) else views)


class RDValidation:
    """The validation side of RCS for ``objective`` (its ``rcs_features`` / ``rcs_head`` hooks, in
    eval mode): ``self(params, pick)`` attacks this worker's validation batches at the fc
    parameters ``params`` (names ``names``), gathers the features and returns the RD gradient vector.

    Natural features do not depend on the fc parameters and are computed once; the random start of
    batch ``b`` after ``pick`` updates is seeded by ``(seed, pick, b)``.
    """

    def __init__(self, objective: RCSMethod, val_set: Dataset[Any], names: Sequence[str], in_dim: int, attack: PGDConfig, *,
                 batch_size: int, seed: int, device: torch.device | str, rank: int = 0, world: int = 1,
                 gather: Gather = lambda t: t) -> None:
        self.objective, self.names, self.attack, self.seed, self.device = objective, list(names), attack, seed, device
        self.gather, self.in_dim = gather, in_dim
        self.dtype = torch.promote_types(next(objective.parameters()).dtype, torch.float32)
        rows = rd_rows(len(cast(Sized, val_set)), batch_size)
        self.mine = list(range(rank, len(rows), world))
        cache: dict[int, torch.Tensor] = {}
        self.images = {}
        for b in self.mine:
            for i in rows[b]:
                if i not in cache:
                    cache[i] = _first_view(val_set[i])
            self.images[b] = torch.stack([cache[i] for i in rows[b]])
        sizes = [len(r) for r in rows]
        counts = [sum(sizes[b] for b in range(r, len(rows), world)) for r in range(world)]
        self.per_rank = max(1, max(counts))
        self.order: list[int] = []
        offsets = [0] * world
        for b, size in enumerate(sizes):
            r = b % world
            self.order.extend(range(r * self.per_rank + offsets[r], r * self.per_rank + offsets[r] + size))
            offsets[r] += size
        with torch.no_grad():
            self.f_nat_mine = {b: objective.rcs_features(self.images[b].to(device, self.dtype), "nat").to(self.dtype)
                               for b in self.mine}
        self.f_nat = self._gathered(list(self.f_nat_mine.values()))

    def _gathered(self, parts: list[torch.Tensor]) -> torch.Tensor:
        block = torch.zeros(self.per_rank, self.in_dim, device=self.device, dtype=self.dtype)
        if parts:
            local = torch.cat(parts)
            block[: local.shape[0]] = local
        return self.gather(block)[self.order].to(self.device)

    def __call__(self, theta: Sequence[torch.Tensor], pick: int) -> torch.Tensor:
        obj = self.objective
        params = {n: t.detach().to(self.device, self.dtype) for n, t in zip(self.names, theta)}

        def adv_output(xa: torch.Tensor) -> torch.Tensor:
            return obj.rcs_head(obj.rcs_features(xa, "adv"), "adv", params)

        adv = []
        for b in self.mine:
            with torch.no_grad():
                z_nat = obj.rcs_head(self.f_nat_mine[b], "nat", params)
            g = torch.Generator().manual_seed(mix_seeds(self.seed, pick, b))
            x_adv = rd_attack(self.images[b].to(self.device, self.dtype), z_nat, adv_output, self.attack, g)
            with torch.no_grad():
                adv.append(obj.rcs_features(x_adv, "adv").to(self.dtype))
        f_adv = self._gathered(adv)
        leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        with torch.enable_grad():
            loss = rd_loss(obj.rcs_head(self.f_nat, "nat", leaves), obj.rcs_head(f_adv, "adv", leaves))
            grads = torch.autograd.grad(loss, list(leaves.values()))
        return grad_vector(grads).cpu()
