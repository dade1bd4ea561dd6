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
otherwise. Images are sharded ``rank::world``; counts are summed over workers by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from rayrcm.attacks import PGDConfig, autoattack_robust, pgd_ce, standard_autoattack
from rayrcm.attacks.autoattack import LABELS
from rayrcm.errors import ConfigError
from rayrcm.eval.base import Evaluation

AA_VERSIONS = ("standard", "apgd")


@dataclass(frozen=True)
class RobustEvalConfig:
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

    def validate(self, key: str = "method.eval") -> RobustEvalConfig:
        PGDConfig(self.norm, self.eps, self.step_size, self.pgd_steps).validate(key)
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


def robust_counts(model: nn.Module, dataset: Dataset, cfg: RobustEvalConfig, *, device: torch.device | str = "cpu",
                  rank: int = 0, world: int = 1, seed: int = 0) -> torch.Tensor:
    """``[total, natural correct, PGD-k robust, APGD-CE+APGD-T robust, AutoAttack (standard) robust]``
    over this rank's shard (the last 0 unless ``aa_version="standard"``)."""
    n = len(dataset)  # type: ignore[arg-type]
    n = min(n, cfg.max_images) if cfg.max_images else n
    shard = Subset(dataset, list(range(rank, n, world)))
    attack = PGDConfig(cfg.norm, cfg.eps, cfg.step_size, cfg.pgd_steps, True)
    counts = torch.zeros(5, dtype=torch.long)
    was_training = model.training
    model.eval()
    torch.manual_seed(seed * 1_000_003 + rank)
    try:
        for b, (views, y) in enumerate(DataLoader(shard, batch_size=cfg.batch_size)):
            x = (views[0] if isinstance(views, (list, tuple)) else views).to(device)
            y = y.to(device)
            if b == 0:
                check_protocol(model, x)
            with torch.no_grad():
                correct = model(x).argmax(1) == y
            counts[0] += len(y)
            counts[1] += int(correct.sum())
            with torch.no_grad():
                counts[2] += int((model(pgd_ce(model, x, y, attack)).argmax(1) == y).sum())
            if cfg.autoattack and cfg.aa_version == "standard":
                aa = standard_autoattack(model, x, y, eps=cfg.eps, norm=cfg.norm, n_iter=cfg.aa_iters,
                                         n_targets=cfg.aa_targets, n_queries=cfg.aa_queries)
                counts[3] += int(aa.upper_bound.sum())
                counts[4] += int(aa.robust.sum())
            elif cfg.autoattack:
                counts[3] += int(autoattack_robust(model, x, y, eps=cfg.eps, norm=cfg.norm, n_iter=cfg.aa_iters,
                                                   n_targets=cfg.aa_targets).sum())
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
    def from_config(cls, cfg: Any) -> RobustAccuracy:
        return cls(cfg.method.robust_eval() or RobustEvalConfig())

    def metric_names(self, prefix: str) -> list[str]:
        c = self.cfg
        aa = ([f"{prefix}_aa_apgd"] if c.autoattack else []) + \
            ([f"{prefix}_aa"] if c.autoattack and c.aa_version == "standard" else [])
        return [f"{prefix}_sa", f"{prefix}_pgd{c.pgd_steps}", *aa, f"{prefix}_robust_images"]

    def counts(self, model, dataset, *, device="cpu", rank=0, world=1, seed=0) -> torch.Tensor:
        return robust_counts(model, dataset, self.cfg, device=device, rank=rank, world=world, seed=seed)

    def metrics(self, counts: torch.Tensor, prefix: str) -> dict[str, float]:
        return robust_metrics(counts, self.cfg, prefix)

    def describe(self) -> str:
        c = self.cfg
        aa = "" if not c.autoattack else (f", {LABELS['aa']} (APGD-CE, APGD-T, FAB-T, Square)"
                                          if c.aa_version == "standard" else f", {LABELS['aa-apgd']}")
        return f"robust evaluation: SA, PGD-{c.pgd_steps}{aa} at {c.norm} eps {c.eps:.4g}"
