"""``shift``: accuracy on distribution-shifted sets read from the user's folders: CIFAR-10.1
(``--shift-path``, source ``cifar10.1``) and the class-folder sets ImageNet-Sketch / -R /
Stylized-ImageNet (``--shift NAME=PATH``, source ``folder``), restricted to the model's classes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rayrcm.errors import ConfigError
from rayrcm.eval.suites.base import (
    NONE,
    Cell,
    CellContext,
    Row,
    ShardSettings,
    Suite,
    resolved_path,
)
from rayrcm.eval.suites.config import EvaluateConfig, check
from rayrcm.eval.suites.folders import folder_set, masked


def shift_specs(cfg: EvaluateConfig) -> dict[str, str]:
    """The ``shift`` part's sets, ``{set name: path}`` (``shift_path`` is ``cifar10.1``); one-line errors."""
    from rayrcm.data.shift import parse_shift

    out = {"cifar10.1": cfg.shift_path} if cfg.shift_path else {}
    for item in cfg.shifts:
        name, path = parse_shift(item)
        check(name not in out, "shift", item, f"names {name} twice (--shift-path is cifar10.1)")
        out[name] = path
    return out


class ShiftSuite(Suite):
    sources = ("cifar10.1", "folder")

    def check(self, cfg: EvaluateConfig) -> None:
        check(bool(shift_specs(cfg)), "suite", "shift",
              "needs --shift-path: a CIFAR-10.1 folder (cifar10.1_v6_data.npy, cifar10.1_v6_labels.npy), or "
              "--shift NAME=PATH (NAME: cifar10.1, sketch, r, stylized)")

    def cells(self, ctx: CellContext) -> list[Cell]:
        from rayrcm.data.shift import read_cifar10_1, read_shift_folder

        out = []
        for name, path in shift_specs(ctx.cfg).items():
            if name == "cifar10.1":
                if ctx.num_classes != 10:
                    raise ConfigError("suite", "shift",
                                      f"CIFAR-10.1 has CIFAR-10's 10 classes; the model has {ctx.num_classes}")
                n = len(read_cifar10_1(path))
                ctx.shifted[name] = {"path": resolved_path(path), "classes": 10, "of": 10, "masked": False, "images": n}
                out.append(Cell(name, NONE, 0, False, NONE, "cifar10.1", n))
            else:
                ctx.shifted[name] = read_shift_folder(name, path, classes=ctx.classes).record(resolved_path(path))
                out.append(Cell(name, NONE, 0, False, NONE, "folder", ctx.shifted[name]["images"]))
        return out

    def images(self, row: Row, images: torch.Tensor, labels: torch.Tensor,
               settings: ShardSettings) -> tuple[torch.Tensor, torch.Tensor]:
        from rayrcm.data.datasets import eval_images

        index = [int(i) for i in row["index"]]
        if str(row["source"]) == "cifar10.1":
            from rayrcm.data.shift import read_cifar10_1

            return eval_images(read_cifar10_1(settings.shift_path), index, settings.image_size)
        return eval_images(_folder(row, settings).dataset, index, settings.image_size, large=settings.large,
                           crop_pct=settings.crop_pct)

    def model(self, model: nn.Module, row: Row, settings: ShardSettings) -> nn.Module:
        return masked(model, _folder(row, settings)) if str(row["source"]) == "folder" else model


def _folder(row: Row, settings: ShardSettings) -> Any:
    name = str(row["set"])
    return folder_set(name, dict(settings.shift_sets)[name], settings.classes, NONE, 0)


__all__ = ["ShiftSuite", "shift_specs"]
