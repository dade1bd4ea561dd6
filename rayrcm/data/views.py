"""View pipelines (none / weak / strong / autoaug) from torchvision, and mixup/cutmix from timm.

All pipelines end in float32 tensors in [0, 1]; normalization is the model's first layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from rayrcm.config import DataConfig


def build_transform(kind: str, size: int, *, large: bool = False, hflip: bool = False) -> v2.Transform:
    """One view pipeline. ``large`` selects ImageNet-style resized crops over pad-and-crop."""
    to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if kind == "none":
        resize = [v2.Resize(int(round(size / 0.875)), antialias=True), v2.CenterCrop(size)] if large else [v2.Resize((size, size), antialias=True)]
        return v2.Compose([v2.ToImage(), *resize, *to_float[1:]])
    flip = [v2.RandomHorizontalFlip()] if hflip else []
    if kind == "weak":
        crop = [v2.RandomResizedCrop(size, antialias=True)] if large else [v2.Resize((size, size), antialias=True), v2.RandomCrop(size, padding=max(1, size // 8))]
        return v2.Compose([v2.ToImage(), *crop, *flip, *to_float[1:]])
    crop = [v2.RandomResizedCrop(size, scale=(0.2 if large else 0.5, 1.0), antialias=True)]
    if kind == "strong":  # SimCLR / MoCo-v2 colour augmentation
        color = [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]
        return v2.Compose([v2.ToImage(), *crop, *flip, *color, *to_float[1:]])
    if kind == "autoaug":
        return v2.Compose([v2.ToImage(), *crop, *flip, v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET), *to_float[1:]])
    raise ValueError(f"unknown augmentation {kind!r}")


def eval_transform_uint8(size: int, *, large: bool = False) -> v2.Transform:
    """The ``"none"`` view without the final conversion: uint8 ``(C, size, size)``; ``/ 255`` gives the
    float image (kept as uint8 so a certification's image list costs a quarter of the memory)."""
    resize = [v2.Resize(int(round(size / 0.875)), antialias=True), v2.CenterCrop(size)] if large else [v2.Resize((size, size), antialias=True)]
    return v2.Compose([v2.ToImage(), *resize, v2.ToDtype(torch.uint8, scale=True)])


class MultiView(Dataset):
    """Wrap a dataset of (raw image, label) into ``((view_1, ..., view_k), label)``."""

    def __init__(self, base: Dataset, transforms: Sequence[v2.Transform]) -> None:
        self.base, self.transforms = base, list(transforms)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[tuple[torch.Tensor, ...], int]:
        image, label = self.base[i]
        return tuple(t(image) for t in self.transforms), label


def build_mixup(cfg: DataConfig, num_classes: int) -> Any | None:
    """timm's Mixup/CutMix (with label smoothing) when either is on, else None."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        switch_prob=cfg.mixup_switch_prob,
        label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
    )
