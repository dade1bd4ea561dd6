"""Datasets (registered by name) yielding [0, 1] image tensors, view pipelines and noise.

The names below load on first use (PEP 562), so ``rayrcm.data.native`` and the config layer import
without torch: a recipe's or a CLI verb's ``--help`` answers before torch is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the names are, for readers and type checkers
    from rayrcm.data.datasets import DATASETS, DatasetSpec, Splits, build_splits
    from rayrcm.data.native import (
        NATIVE_SIZES,
        native_size,
        register_native_size,
        resolve_image_size,
    )
    from rayrcm.data.noise import add_gaussian_noise, karras_sigmas
    from rayrcm.data.views import MultiView, build_mixup, build_transform

_HOMES = {
    "DATASETS": "datasets", "DatasetSpec": "datasets", "Splits": "datasets", "build_splits": "datasets",
    "NATIVE_SIZES": "native", "native_size": "native", "register_native_size": "native",
    "resolve_image_size": "native",
    "add_gaussian_noise": "noise", "karras_sigmas": "noise",
    "MultiView": "views", "build_mixup": "views", "build_transform": "views",
}

__all__ = [
    "DATASETS", "NATIVE_SIZES", "DatasetSpec", "MultiView", "Splits", "add_gaussian_noise", "build_mixup",
    "build_splits", "build_transform", "karras_sigmas", "native_size", "register_native_size", "resolve_image_size",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
