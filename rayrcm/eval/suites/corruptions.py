"""``corruptions``: accuracy on common corruptions at the job's severities, generated from the clean
images under key ``(seed, image index, corruption, severity)`` (source ``generated``), or read from a
released folder (``c_path``): CIFAR-10-C / CIFAR-100-C ``<corruption>.npy`` files (``released``), or
ImageNet-C ``<corruption>/<severity>/<wnid>/`` restricted to the model's classes (``imagenet-c``)."""

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
from rayrcm.eval.suites.config import EvaluateConfig
from rayrcm.eval.suites.folders import folder_set, masked


class CorruptionSuite(Suite):
    sources = ("generated", "released", "imagenet-c")

    def check(self, cfg: EvaluateConfig) -> None:
        if not cfg.c_path:  # generated: every name known before the model is read
            from rayrcm.data.corruptions import check_corruption

            for c in cfg.corruptions:
                check_corruption(c, cfg.severities[0])

    def cells(self, ctx: CellContext) -> list[Cell]:
        cfg = ctx.cfg
        if cfg.c_path and ctx.large:
            return _imagenet_c_cells(cfg, ctx.classes, ctx.shifted)
        if cfg.c_path:
            from rayrcm.data.shift import cifar_c_corruptions

            names = list(cfg.corruptions) or cifar_c_corruptions(cfg.c_path)
            if not names:
                raise ConfigError("c_path", cfg.c_path, "holds no <corruption>.npy file")
            released = "cifar100-c" if ctx.num_classes == 100 else "cifar10-c"
            return [Cell(released, c, s, False, NONE, "released") for c in names for s in cfg.severities]
        from rayrcm.data.corruptions import check_corruption, corruption_names, generated_set_name

        names = list(cfg.corruptions) or corruption_names()
        for c in names:
            for s in cfg.severities:
                check_corruption(c, s)
        gen = generated_set_name(ctx.dataset)
        return [Cell(gen, c, s, True, NONE, "generated") for c in names for s in cfg.severities]

    def check_cells(self, cfg: EvaluateConfig, cells: list[Cell], indices: list[int], num_classes: int) -> None:
        """Every released file there, readable, and long enough for the job's images (one line each)."""
        from rayrcm.data.shift import read_cifar_c

        top = max(indices)
        for cell in cells:
            if cell.source != "released":
                continue
            ds = read_cifar_c(cfg.c_path, cell.corruption, cell.severity, num_classes=num_classes)
            if len(ds) <= top:
                raise ConfigError("c_path", cfg.c_path, f"{cell.corruption}.npy has {len(ds)} images per severity; "
                                  f"the job's images go up to index {top}")

    def images(self, row: Row, images: torch.Tensor, labels: torch.Tensor,
               settings: ShardSettings) -> tuple[torch.Tensor, torch.Tensor]:
        from rayrcm.data.datasets import eval_images

        start, stop = int(row["start"]), int(row["stop"])
        index = [int(i) for i in row["index"]]
        corruption, severity = str(row["corruption"]), int(row["severity"])
        if str(row["source"]) == "generated":
            from rayrcm.data.corruptions import corrupt_tensor

            return corrupt_tensor(images[start:stop], index, corruption, severity, seed=settings.seed), labels[start:stop]
        if str(row["source"]) == "released":
            from rayrcm.data.shift import read_cifar_c

            ds = read_cifar_c(settings.c_path, corruption, severity, num_classes=settings.num_classes)
            return eval_images(ds, index, settings.image_size)
        return eval_images(_imagenet_c(row, settings).dataset, index, settings.image_size, large=settings.large,
                           crop_pct=settings.crop_pct)

    def model(self, model: nn.Module, row: Row, settings: ShardSettings) -> nn.Module:
        return masked(model, _imagenet_c(row, settings)) if str(row["source"]) == "imagenet-c" else model


def _imagenet_c(row: Row, settings: ShardSettings) -> Any:
    return folder_set("imagenet-c", settings.c_path, settings.classes, str(row["corruption"]), int(row["severity"]))


def _imagenet_c_cells(cfg: EvaluateConfig, classes: tuple[str, ...], shifted: dict[str, dict[str, Any]]) -> list[Cell]:
    """Released ImageNet-C (``<corruption>/<severity>/<wnid>/``) restricted to the model's classes."""
    from rayrcm.data.shift import imagenet_c_corruptions, read_imagenet_c

    names = list(cfg.corruptions) or imagenet_c_corruptions(cfg.c_path)
    if not names:
        raise ConfigError("c_path", cfg.c_path, "holds no ImageNet-C <corruption>/<severity>/<wnid>/ folder")
    out = []
    for c in names:
        for s in cfg.severities:
            info: dict[str, Any] = read_imagenet_c(cfg.c_path, c, s, classes=classes).record(resolved_path(cfg.c_path))
            old = shifted.setdefault("imagenet-c", info)  # the fewest classes left by any corruption and severity
            old["classes"], old["images"] = min(old["classes"], info["classes"]), min(old["images"], info["images"])
            out.append(Cell("imagenet-c", c, s, False, NONE, "imagenet-c", info["images"]))
    return out


__all__ = ["CorruptionSuite"]
