"""The native image size of each dataset: the ``data.image_size`` a config gets when it does not set
one (``data.image_size=0``).

The bundled digits are 8 x 8 images read at 16 x 16 (rayrcm's default since the start), CIFAR-10/100
are 32 x 32, and ImageNet-style folders are read at 224 x 224 (short side resized to
``224 / data.crop_pct``, then centre-cropped, as the evaluation view does). A dataset registered
by a plugin declares its size with :func:`register_native_size`, or with a ``native_size``
attribute on its :class:`~rayrcm.data.datasets.DatasetSpec`; without either, its configs must set
``data.image_size``.
"""

from __future__ import annotations

from dataclasses import replace

from rayrcm.sections import DataConfig

NATIVE_SIZES: dict[str, int] = {"digits": 16, "cifar10": 32, "cifar100": 32, "imagefolder": 224}


def register_native_size(name: str, size: int) -> None:
    """Declare the native image size of dataset ``name`` (a plugin's dataset)."""
    if int(size) < 4:
        raise ValueError(f"the native image size of {name!r} must be >= 4, not {size!r}")
    NATIVE_SIZES[name] = int(size)


def native_size(name: str) -> int | None:
    """The native image size of dataset ``name``; None when it declares none."""
    from rayrcm.data.datasets import DATASETS

    if name in DATASETS:
        declared = getattr(DATASETS.get(name), "native_size", 0)
        if declared:
            return int(declared)
    return NATIVE_SIZES.get(name)


def resolve_image_size(d: DataConfig) -> DataConfig:
    """``d`` with ``image_size=0`` replaced by the dataset's native size (unchanged when the size is
    set, or when the dataset declares none: :func:`rayrcm.config.validate` reports that)."""
    if d.image_size:
        return d
    size = native_size(d.name)
    return replace(d, image_size=size) if size else d


__all__ = ["NATIVE_SIZES", "native_size", "register_native_size", "resolve_image_size"]
