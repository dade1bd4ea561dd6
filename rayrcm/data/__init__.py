"""Datasets (registered by name) yielding [0, 1] image tensors, view pipelines and noise."""

from rayrcm.data.datasets import DATASETS, DatasetSpec, Splits, build_splits
from rayrcm.data.native import NATIVE_SIZES, native_size, register_native_size, resolve_image_size
from rayrcm.data.noise import add_gaussian_noise, karras_sigmas
from rayrcm.data.views import MultiView, build_mixup, build_transform

__all__ = [
    "DATASETS",
    "NATIVE_SIZES",
    "DatasetSpec",
    "MultiView",
    "Splits",
    "add_gaussian_noise",
    "build_mixup",
    "build_splits",
    "build_transform",
    "karras_sigmas",
    "native_size",
    "register_native_size",
    "resolve_image_size",
]
