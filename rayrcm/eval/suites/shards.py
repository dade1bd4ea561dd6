"""A shard of an evaluation job, computed by its suite (pure: the Ray Data actor of
:mod:`rayrcm.orchestration.evaluate_actor` calls these per row).

:func:`row_hits` is what an actor does with a row: the owning suite's images, model and per-batch
``correct``, in batches of ``settings.batch`` (so the attacks' seeds, per image for PGD and per
batch's first image for AutoAttack, match the training chain's evaluation, :mod:`rayrcm.eval.robust`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from torch import nn

from rayrcm.eval.suites import EVALUATE_SUITES
from rayrcm.eval.suites.base import Row, ShardSettings, Suite

SOURCES = tuple(dict.fromkeys(s for n in EVALUATE_SUITES.ordered() for s in EVALUATE_SUITES.get(n).sources))


def shard_images(row: Row, images: torch.Tensor, labels: torch.Tensor,
                 settings: ShardSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The shard's uint8 ``(B, 3, H, W)`` images and labels, read by the suite that owns the row."""
    return EVALUATE_SUITES.of_row(row).images(row, images, labels, settings)


def shard_model(model: nn.Module, row: Row, settings: ShardSettings) -> nn.Module:
    """The model a shard is scored with (masked to the set's classes for a masked set: ImageNet-R)."""
    return EVALUATE_SUITES.of_row(row).model(model, row, settings)


def suite_hits(suite: Suite, model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, index: Sequence[int],
               settings: ShardSettings, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per image (``index``: their image indices), ``suite.correct`` in batches of ``settings.batch``."""
    model.eval()
    hits = []
    for lo in range(0, len(y), settings.batch):
        x = x_u8[lo:lo + settings.batch].to(device).float().div_(255)
        t = y[lo:lo + settings.batch].to(device)
        hits.append(suite.correct(model, x, t, index[lo:lo + settings.batch], settings).cpu())
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)


def shard_hits(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, attack: str, settings: ShardSettings, *,
               index: Sequence[int] | None = None, key: str = "", device: torch.device | str = "cpu") -> torch.Tensor:
    """Per image of the shard, whether the model classifies it right under ``attack`` (``none``,
    ``pgd<k>``, ``aa``, ``aa-apgd``: the suite whose cells carry it). Without ``index`` the images
    are numbered ``0..len(y)-1``; ``key`` (which seeded the attacks before they were seeded by
    image) is accepted and unused."""
    del key
    index = list(range(len(y))) if index is None else [int(i) for i in index]
    return suite_hits(EVALUATE_SUITES.of_attack(attack), model, x_u8, y, index, settings, device)


def shard_correct(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, attack: str, settings: ShardSettings, *,
                  index: Sequence[int] | None = None, key: str = "", device: torch.device | str = "cpu") -> int:
    """How many of the shard's images the model classifies right (:func:`shard_hits`, summed)."""
    return int(shard_hits(model, x_u8, y, attack, settings, index=index, key=key, device=device).sum())


def row_hits(model: nn.Module, row: Row, images: torch.Tensor, labels: torch.Tensor, settings: ShardSettings,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels, hits)`` of a shard row: its suite's images, model and ``correct`` (the actor's work)."""
    suite = EVALUATE_SUITES.of_row(row)
    x, y = suite.images(row, images, labels, settings)
    scored = suite.model(model, row, settings)
    return y, suite_hits(suite, scored, x, y, [int(i) for i in row["index"]], settings, device)


def class_counts(y: torch.Tensor, hits: torch.Tensor) -> str:
    """A shard's per-class counts as JSON ``{"<class>": [images, correct], ...}`` (a Parquet string column)."""
    out: dict[str, list[int]] = {}
    for label, hit in zip(y.tolist(), hits.tolist()):
        cell = out.setdefault(str(int(label)), [0, 0])
        cell[0] += 1
        cell[1] += int(hit)
    return json.dumps(out, sort_keys=True)


__all__ = ["SOURCES", "class_counts", "row_hits", "shard_correct", "shard_hits", "shard_images", "shard_model",
           "suite_hits"]
