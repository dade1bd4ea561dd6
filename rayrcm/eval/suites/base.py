"""What every ``rayrcm evaluate`` suite is (pure: no Ray, no MLflow).

A :class:`Suite` knows the cells it adds to a job (:meth:`Suite.cells`: :class:`Cell`, one cell of
the result schema and where its images come from), which shard rows are its own
(:meth:`Suite.owns`: a row's image ``source`` and ``attack``), and how a shard of it is computed:
its images (:meth:`Suite.images`), the model it scores (:meth:`Suite.model`) and, per batch of
[0, 1] images, which ones the model gets right (:meth:`Suite.correct`). Everything a shard depends
on is its row and the job's :class:`ShardSettings`, never which worker ran it, so results are the
same on any number of workers. Suites are registered by name in :mod:`rayrcm.eval.suites`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from rayrcm.analysis.robustness import NONE
from rayrcm.attacks.budget import AttackBudget
from rayrcm.eval.suites.config import EvaluateConfig

Row = dict[str, Any]  # a shard row: key, source, set, corruption, severity, attack, start, stop, index


@dataclass(frozen=True)
class Cell:
    """One evaluated cell of the result schema and where its images come from."""

    set: str
    corruption: str
    severity: int
    generated: bool
    attack: str
    source: str  # clean | generated | released | cifar10.1 | folder | imagenet-c (a suite's ``sources``)
    size: int = 0  # images of the cell's own set (a shifted set); 0 = the job's clean images


@dataclass
class CellContext:
    """What a suite's cells may depend on: the job's config, the dataset and the model's classes
    (``classes``: their wnids in output order, for folder sets); ``shifted`` collects each read
    set's record (path, classes left, images) for the protocol."""

    cfg: EvaluateConfig
    dataset: str
    num_classes: int
    large: bool = False
    classes: tuple[str, ...] = ()
    shifted: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class ShardSettings:
    """What every shard of a job shares: the protocol's numbers and the actors' resources."""

    seed: int = 0
    batch: int = 256
    eps: float = 8 / 255
    step_size: float = 2 / 255
    pgd_steps: int = 20
    aa_iters: int = 100
    aa_targets: int = 9
    aa_queries: int = 5000
    norm: str = "linf"
    image_size: int = 32
    num_classes: int = 10
    c_path: str = ""  # the released CIFAR-C folder (read by the actors: a path every node sees)
    shift_path: str = ""  # the CIFAR-10.1 folder (likewise)
    shift_sets: tuple[tuple[str, str], ...] = ()  # (set, folder) of the class-folder sets (Sketch, R, Stylized)
    classes: tuple[str, ...] = ()  # the model's classes in output order (the folder sets are restricted to them)
    large: bool = False  # the evaluation view of large images (resize, centre crop: imagefolder)
    crop_pct: float = 0.875
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    plugins: tuple[str, ...] = ()

    @property
    def budget(self) -> AttackBudget:
        """The attacks' budget (PGD's steps are ``pgd_steps``; AutoAttack uses its norm and eps)."""
        return AttackBudget(self.norm, self.eps, self.step_size, self.pgd_steps)


def resolved_path(path: str) -> str:
    return str(Path(path).expanduser().resolve())


class Suite:
    """One part of ``rayrcm evaluate --suite`` (see the module docstring). The defaults are those of
    a plain forward pass on the job's clean images."""

    sources: tuple[str, ...] = ("clean",)  # where its cells' images come from

    def check(self, cfg: EvaluateConfig) -> None:
        """What can be checked without the model or the data (one-line errors)."""

    def cells(self, ctx: CellContext) -> list[Cell]:
        raise NotImplementedError

    def check_cells(self, cfg: EvaluateConfig, cells: list[Cell], indices: list[int], num_classes: int) -> None:
        """Before any Ray work: the files its ``cells`` read are there and long enough for ``indices``."""

    def owns_attack(self, attack: str) -> bool:
        return attack == NONE

    def owns(self, row: Row) -> bool:
        """Whether a shard row (or a :class:`Cell`'s fields) is one of this suite's."""
        return str(row["source"]) in self.sources and self.owns_attack(str(row["attack"]))

    def images(self, row: Row, images: torch.Tensor, labels: torch.Tensor,
               settings: ShardSettings) -> tuple[torch.Tensor, torch.Tensor]:
        """The shard's uint8 ``(B, 3, H, W)`` images and labels (``images``, ``labels``: the job's clean ones)."""
        start, stop = int(row["start"]), int(row["stop"])
        return images[start:stop], labels[start:stop]

    def model(self, model: nn.Module, row: Row, settings: ShardSettings) -> nn.Module:
        """The model the shard is scored with (a set may mask its logits to the classes it holds)."""
        return model

    def correct(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: Sequence[int],
                settings: ShardSettings) -> torch.Tensor:
        """Per image of one batch (``x`` in [0, 1], ``indices``: the images' indices, which seed any
        attack): whether the model classifies it right."""
        with torch.no_grad():
            return cast(torch.Tensor, model(x).argmax(1) == y)


__all__ = ["NONE", "Cell", "CellContext", "Row", "ShardSettings", "Suite", "resolved_path"]
