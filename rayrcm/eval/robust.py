"""Robust accuracy of a classifier on [0, 1] images: SA, PGD-k and the standard AutoAttack.

The protocol of the ACL/AIR/RCS papers (seed 001; the authors' ``finetuning.py``):

* ``SA``: accuracy on the natural test images;
* ``PGD-20``: accuracy under L-inf PGD, ``eps = 8/255``, step ``2/255``, 20 steps, random start,
  untargeted CE (:func:`rayrcm.attacks.pgd_ce`);
* ``AA`` (``<prefix>_aa``, "AutoAttack (standard)"): accuracy under Croce & Hein's standard
  AutoAttack, APGD-CE (100 iterations), APGD-T (100 iterations, 9 target classes), FAB-T (100
  iterations, 9 target classes) and Square (5000 queries), each on the points still robust, a
  sample counting as robust only if it survives all four
  (:func:`rayrcm.attacks.standard_autoattack`);
* ``<prefix>_aa_apgd`` ("APGD-CE+APGD-T (upper bound)"): robust after the first two of them, from
  the same draws (so never below ``AA``); with ``aa_version="apgd"`` only this one runs
  (:func:`rayrcm.attacks.autoattack_robust`).

The model is evaluated in eval mode; before attacking, the protocol checks that it is
deterministic (two passes agree) and returns logits rather than probabilities, and refuses
otherwise.

**Seeding** (shared with the ``pgd``, ``aa`` and ``aa-apgd`` suites of ``rayrcm evaluate``,
:mod:`rayrcm.eval.suites`): PGD's random start of an image is drawn from its own generator, seeded
by ``(seed, image index)`` (:func:`pgd_starts`), so it does not depend on the batch, the shard or
the worker. AutoAttack's draws are shared across a batch (APGD's starts, Square's square positions),
so its global generator is seeded per batch by ``(seed, index of the batch's first image)``
(:func:`batch_seed`); batches are cut at fixed positions (``[b * batch, (b + 1) * batch)``, whole
batches per worker), which the evaluation job's shards also respect when ``shard_size`` is a
multiple of ``batch``. With the same seed, images and batch size, this evaluation and the job give
the same SA, PGD and AutoAttack counts.
Counts are summed over workers by the caller.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from rayrcm.attacks import (
    AttackBudget,
    PGDConfig,
    autoattack_robust,
    pgd,
    project,
    standard_autoattack,
)
from rayrcm.attacks.autoattack import LABELS
from rayrcm.errors import ConfigError
from rayrcm.eval.base import Evaluation

if TYPE_CHECKING:
    from rayrcm.sections import Experiment

AA_VERSIONS = ("standard", "apgd")


@dataclass(frozen=True)
class RobustEvalConfig:
    """The training chain's robust evaluation. Flat fields (the method's ``eval_*`` keys and
    ``RobustEvalConfig(eps=..., pgd_steps=...)`` callers); the budget is :attr:`budget`."""

    norm: str = "linf"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    pgd_steps: int = 20
    autoattack: bool = True
    aa_iters: int = 100
    aa_targets: int = 9
    max_images: int = 0  # 0 = the whole split
    batch_size: int = 256
    aa_version: str = "standard"  # standard: APGD-CE, APGD-T, FAB-T, Square; apgd: the first two (an upper bound)
    aa_queries: int = 5000  # Square's queries (the standard AutoAttack's 5000)

    @classmethod
    def of(cls, budget: AttackBudget, **rest: Any) -> RobustEvalConfig:
        """PGD-``budget.steps`` (and AutoAttack) at ``budget``; ``rest``: the other fields."""
        return cls(budget.norm, budget.eps, budget.step_size, budget.steps, **rest)

    @property
    def budget(self) -> AttackBudget:
        """The attack budget: PGD's steps are ``pgd_steps``; AutoAttack uses its norm and eps."""
        return AttackBudget(self.norm, self.eps, self.step_size, self.pgd_steps)

    def validate(self, key: str = "method.eval") -> RobustEvalConfig:
        self.budget.validate(key)
        if self.pgd_steps < 1 or self.aa_iters < 1 or self.aa_targets < 1:
            raise ConfigError(f"{key}_pgd_steps", self.pgd_steps, "steps, iterations and targets must be >= 1")
        if self.aa_version not in AA_VERSIONS:
            raise ConfigError(f"{key}_aa_version", self.aa_version, f"choose one of: {', '.join(AA_VERSIONS)}")
        if self.aa_queries < 1:
            raise ConfigError(f"{key}_aa_queries", self.aa_queries, "must be >= 1")
        if self.max_images < 0:
            raise ConfigError(f"{key}_max_images", self.max_images, "must be >= 0 (0 = all)")
        return self


def check_protocol(model: nn.Module, x: torch.Tensor) -> None:
    """Refuse a model in training mode, a non-deterministic one, or one that outputs probabilities."""
    if model.training:
        raise ValueError("robust evaluation needs the model in eval mode")
    with torch.no_grad():
        a, b = model(x), model(x)
    if not torch.allclose(a, b, atol=1e-5):
        raise ValueError("the model is not deterministic (two passes differ); attacks would be unreliable")
    if a.min() >= 0 and torch.allclose(a.sum(1), torch.ones_like(a[:, 0]), atol=1e-4):
        raise ValueError("the model returns probabilities; attacks need logits")


def _mix(*parts: object) -> int:
    """A 63-bit seed from the parts (CRC32 of their text, mixed with the first integer part)."""
    text = "|".join(str(p) for p in parts)
    return (int(cast(int, parts[0])) * 1_000_003 + zlib.crc32(text.encode())) % (2**63 - 1)


def image_seed(seed: int, index: int) -> int:
    """The seed of one image's PGD random start: a function of the job's seed and the image index only."""
    return _mix(seed, "pgd", int(index))


def batch_seed(seed: int, first_index: int) -> int:
    """The global-generator seed of AutoAttack on a batch (``aa`` and ``aa-apgd`` alike, so that the
    standard version's first two attacks replay ``aa-apgd``'s draws): seed and first image index."""
    return _mix(seed, "aa", int(first_index))


def pgd_starts(x: torch.Tensor, indices: Sequence[int], seed: int, eps: float, norm: str) -> torch.Tensor:
    """PGD's random start of each image (as :func:`rayrcm.attacks.random_start`), drawn from a
    generator seeded by :func:`image_seed`: the same start for an image in any batch."""
    shape = tuple(x.shape[1:])
    deltas = []
    for i in indices:
        g = torch.Generator().manual_seed(image_seed(seed, int(i)))
        if norm == "linf":
            d = (torch.rand(shape, generator=g) * 2 - 1) * eps
        else:
            u = torch.randn(shape, generator=g)
            d = u / u.flatten().norm().clamp_min(1e-12) * torch.rand((), generator=g) * eps
        deltas.append(d)
    delta = torch.stack(deltas).to(device=x.device, dtype=x.dtype)
    return project(delta, x, eps, norm)


def pgd_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: Sequence[int], cfg: PGDConfig,
                seed: int) -> torch.Tensor:
    """Per image: still classified right after L-inf/L2 PGD-k (untargeted CE) from its own random start."""
    start = pgd_starts(x, indices, seed, cfg.eps, cfg.norm)
    x_adv = pgd(lambda xa: F.cross_entropy(model(xa).float(), y, reduction="sum"), [x], cfg, init=[start])[0]
    with torch.no_grad():
        return cast(torch.Tensor, model(x_adv).argmax(1) == y)


def _devices(x: torch.Tensor) -> list[int]:
    return [x.device.index or 0] if x.device.type == "cuda" else []


def autoattack_masks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: Sequence[int], *, seed: int,
                     eps: float, norm: str = "linf", aa_iters: int = 100, aa_targets: int = 9, aa_queries: int = 5000,
                     standard: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(robust, upper_bound)`` of one batch: the standard AutoAttack and its first two attacks from
    the same draws (``standard=False``: APGD-CE+APGD-T only, both masks the same), the global
    generator seeded by :func:`batch_seed` inside, the caller's stream untouched."""
    with torch.random.fork_rng(devices=_devices(x)):
        torch.manual_seed(batch_seed(seed, int(indices[0])))
        if standard:
            out = standard_autoattack(model, x, y, eps=eps, norm=norm, n_iter=aa_iters, n_targets=aa_targets,
                                      n_queries=aa_queries)
            return out.robust, out.upper_bound
        robust = autoattack_robust(model, x, y, eps=eps, norm=norm, n_iter=aa_iters, n_targets=aa_targets)
        return robust, robust


def batches(n: int, batch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """The positions ``0..n-1`` cut into batches at fixed positions; this rank's share (every
    ``world``-th batch from ``rank``), so a batch is the same on any number of workers."""
    cuts = [list(range(lo, min(lo + batch, n))) for lo in range(0, n, batch)]
    return cuts[rank::world]


def robust_counts(model: nn.Module, dataset: Dataset[Any], cfg: RobustEvalConfig, *, device: torch.device | str = "cpu",
                  rank: int = 0, world: int = 1, seed: int = 0) -> torch.Tensor:
    """``[total, natural correct, PGD-k robust, APGD-CE+APGD-T robust, AutoAttack (standard) robust]``
    over this rank's batches (the last 0 unless ``aa_version="standard"``); see the module's seeding."""
    n = len(dataset)  # type: ignore[arg-type]
    n = min(n, cfg.max_images) if cfg.max_images else n
    attack = PGDConfig.of(cfg.budget)
    counts = torch.zeros(5, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        for b, idx in enumerate(batches(n, cfg.batch_size, rank, world)):
            views, y = next(iter(DataLoader(Subset(dataset, idx), batch_size=len(idx))))
            x = (views[0] if isinstance(views, (list, tuple)) else views).to(device)
            y = y.to(device)
            if b == 0:
                check_protocol(model, x)
            counts[0] += len(y)
            with torch.no_grad():
                counts[1] += int((model(x).argmax(1) == y).sum())
            counts[2] += int(pgd_correct(model, x, y, idx, attack, seed).sum())
            if cfg.autoattack:
                robust, upper = autoattack_masks(model, x, y, idx, seed=seed, eps=cfg.eps, norm=cfg.norm,
                                                 aa_iters=cfg.aa_iters, aa_targets=cfg.aa_targets,
                                                 aa_queries=cfg.aa_queries, standard=cfg.aa_version == "standard")
                counts[3] += int(upper.sum())
                counts[4] += int(robust.sum()) if cfg.aa_version == "standard" else 0
    finally:
        model.train(was_training)
    return counts


def robust_metrics(counts: torch.Tensor, cfg: RobustEvalConfig, prefix: str = "test") -> dict[str, float]:
    total = max(int(counts[0]), 1)
    out = {f"{prefix}_sa": float(counts[1]) / total, f"{prefix}_pgd{cfg.pgd_steps}": float(counts[2]) / total}
    if cfg.autoattack:
        out[f"{prefix}_aa_apgd"] = float(counts[3]) / total
        if cfg.aa_version == "standard":
            out[f"{prefix}_aa"] = float(counts[4]) / total
    out[f"{prefix}_robust_images"] = float(total)
    return out


class RobustAccuracy(Evaluation):
    """``<prefix>_sa``, ``<prefix>_pgd<k>``, ``<prefix>_aa`` (the standard AutoAttack),
    ``<prefix>_aa_apgd`` (its first two attacks, an upper bound) and ``<prefix>_robust_images``, with
    the method's attack budget (``MethodConfig.robust_eval()``), else the seed's L-inf 8/255 protocol."""

    def __init__(self, cfg: RobustEvalConfig) -> None:
        self.cfg = cfg

    @classmethod
    def from_config(cls, cfg: Experiment) -> RobustAccuracy:
        return cls(cfg.method.robust_eval() or RobustEvalConfig())

    def metric_names(self, prefix: str) -> list[str]:
        c = self.cfg
        aa = ([f"{prefix}_aa_apgd"] if c.autoattack else []) + \
            ([f"{prefix}_aa"] if c.autoattack and c.aa_version == "standard" else [])
        return [f"{prefix}_sa", f"{prefix}_pgd{c.pgd_steps}", *aa, f"{prefix}_robust_images"]

    def counts(self, model: nn.Module, dataset: Dataset[Any], *, device: torch.device | str = "cpu", rank: int = 0,
               world: int = 1, seed: int = 0) -> torch.Tensor:
        return robust_counts(model, dataset, self.cfg, device=device, rank=rank, world=world, seed=seed)

    def metrics(self, counts: torch.Tensor, prefix: str) -> dict[str, float]:
        return robust_metrics(counts, self.cfg, prefix)

    def describe(self) -> str:
        c = self.cfg
        aa = "" if not c.autoattack else (f", {LABELS['aa']} (APGD-CE, APGD-T, FAB-T, Square)"
                                          if c.aa_version == "standard" else f", {LABELS['aa-apgd']}")
        return f"robust evaluation: SA, PGD-{c.pgd_steps}{aa} at {c.norm} eps {c.eps:.4g}"
