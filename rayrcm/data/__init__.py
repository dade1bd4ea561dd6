"""Datasets (registered by name) yielding [0, 1] image tensors, view pipelines and noise."""

from rayrcm.data.datasets import DATASETS, DatasetSpec, Splits, build_splits
from rayrcm.data.noise import add_gaussian_noise, karras_sigmas
from rayrcm.data.views import MultiView, build_mixup, build_transform

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "MultiView",
    "Splits",
    "add_gaussian_noise",
    "build_mixup",
    "build_splits",
    "build_transform",
    "karras_sigmas",
]
