"""Class-folder sets of the ``corruptions`` (ImageNet-C) and ``shift`` (Sketch, R, Stylized) suites:
read once per process, restricted to the model's classes, logits masked where the set says so."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn


@functools.lru_cache(maxsize=64)
def folder_set(name: str, path: str, classes: tuple[str, ...], corruption: str, severity: int) -> Any:
    """The :class:`rayrcm.data.shift.ShiftSet` of a folder set (``imagenet-c``: one corruption and severity)."""
    from rayrcm.data.shift import read_imagenet_c, read_shift_folder

    if name == "imagenet-c":
        return read_imagenet_c(path, corruption, severity, classes=classes)
    return read_shift_folder(name, path, classes=classes)


class MaskedModel(nn.Module):
    """``model`` with its logits masked to the classes ``present`` in a set (ImageNet-R's protocol)."""

    def __init__(self, model: nn.Module, present: tuple[int, ...]) -> None:
        super().__init__()
        self.model, self.present = model, tuple(present)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from rayrcm.data.shift import mask_logits

        return mask_logits(self.model(x), self.present)


def masked(model: nn.Module, shift_set: Any) -> nn.Module:
    """``model``, masked to the set's classes when the set is masked."""
    return MaskedModel(model, shift_set.present) if shift_set.masked else model


__all__ = ["MaskedModel", "folder_set", "masked"]
