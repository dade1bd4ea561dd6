"""Dataset registry: the bundled ``digits`` default, CIFAR-10/100 on disk, ImageNet-style folders.

Every dataset gives raw images (uint8 tensors or PIL images) and integer labels; the view
transforms in :mod:`rayrcm.data.views` turn them into float tensors in [0, 1]. Nothing is ever
downloaded: CIFAR and ImageFolder data are read from ``data.path``.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Sized
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.utils.data import Dataset, Subset

from rayrcm.errors import ConfigError
from rayrcm.registry import Registry
from rayrcm.sections import DataConfig

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image


@dataclass(frozen=True)
class Splits:
    """Train / validation (held out from train) / test datasets of (raw image, label)."""

    train: Dataset[Any]
    val: Dataset[Any]
    test: Dataset[Any]
    num_classes: int
    large: bool  # ImageNet-style crops (RandomResizedCrop) rather than pad-and-crop


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    load: Callable[[DataConfig], tuple[Dataset[Any], Dataset[Any], int]]  # (train+val pool, test, classes)
    check_path: Callable[[str | None], None]
    large: bool = False
    native_size: int = 0  # data.image_size=0 resolves to this (0: rayrcm.data.native's table)


DATASETS: Registry[DatasetSpec] = Registry("dataset")


class TensorImages(Dataset[Any]):
    """uint8 images ``(N, C, H, W)`` with integer labels ``(N,)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        assert images.dtype == torch.uint8 and images.ndim == 4
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def _split_indices(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified split of ``range(len(labels))`` into (rest, held_out) with a fixed seed."""
    if fraction <= 0:
        return list(range(len(labels))), []
    from sklearn.model_selection import train_test_split

    idx = list(range(len(labels)))
    rest, held = train_test_split(idx, test_size=fraction, random_state=seed, stratify=labels)
    return sorted(rest), sorted(held)


def _labels_of(ds: Dataset[Any]) -> list[int]:
    for attr in ("labels", "targets"):
        if hasattr(ds, attr):
            return [int(v) for v in getattr(ds, attr)]
    return [int(ds[i][1]) for i in range(len(cast(Sized, ds)))]


def _fraction_range(n: int, k: int) -> tuple[float, float] | None:
    """The ``data.val_fraction`` values (3 decimals) whose stratified split of ``n`` images in ``k``
    classes leaves at least ``k`` images on each side, as ``(lowest, highest)``; None when none does."""
    lo = math.ceil(k / n * 1000) / 1000
    hi = math.floor((n - k) / n * 1000) / 1000
    while hi >= lo and n - math.ceil(hi * n) < k:  # sklearn's held-out count is ceil(fraction * n)
        hi = round(hi - 0.001, 3)
    return (lo, hi) if 0 < lo <= hi < 1 else None


def _check_fraction(labels: list[int], fraction: float, name: str) -> None:
    """One line naming ``data.val_fraction`` when the stratified split of ``labels`` cannot be made."""
    if fraction <= 0:
        return
    n, counts = len(labels), Counter(labels)
    k, held = len(counts), math.ceil(fraction * n)
    rest = n - held
    if n and held >= k and rest >= k and min(counts.values()) >= 2:
        return
    works = _fraction_range(n, k) if n and min(counts.values()) >= 2 else None
    fix = (f"use data.val_fraction from {works[0]:g} to {works[1]:g}, or 0 for no validation split" if works
           else "too few images per class for a stratified split: use data.val_fraction=0 (no validation split)")
    if n == 0:
        what = f"{name} has no training images to split"
    elif rest <= 0:
        what = f"leaves 0 training images (all {n} images of {name} go to validation)"
    elif n and min(counts.values()) < 2:
        rare = min(counts, key=lambda c: counts[c])
        what = f"cannot split {name}'s {n} images: class {rare} has only {counts[rare]} (a stratified split needs 2)"
    elif held < k:
        what = f"holds out {held} of the {n} images of {name} for validation, fewer than its {k} classes"
    else:
        what = f"leaves {rest} of the {n} images of {name} for training, fewer than its {k} classes"
    raise ConfigError("data.val_fraction", fraction, f"{what}; {fix}")


def build_splits(cfg: DataConfig) -> Splits:
    """Load ``cfg.name`` and hold out a stratified validation split (fixed seed) from train; a
    ``data.val_fraction`` that leaves a side with fewer images than classes is one line naming it."""
    spec = DATASETS.get(cfg.name)
    spec.check_path(cfg.path)
    pool, test, num_classes = spec.load(cfg)
    labels = _labels_of(pool)
    _check_fraction(labels, cfg.val_fraction, cfg.name)
    train_idx, val_idx = _split_indices(labels, cfg.val_fraction, seed=1)
    return Splits(Subset(pool, train_idx), Subset(pool, val_idx), test, num_classes, spec.large)


def eval_split(cfg: DataConfig, split: str) -> tuple[Dataset[Any], int, bool]:
    """``(dataset, num_classes, large)`` for ``split`` in ``test`` / ``val`` (the held-out part of train)."""
    splits = build_splits(cfg)
    return (splits.test if split == "test" else splits.val), splits.num_classes, splits.large


def eval_images(ds: Dataset[Any], indices: list[int], size: int, *, large: bool = False,
                crop_pct: float = 0.875) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``(K, C, size, size)`` and labels ``(K,)`` of ``ds[indices]`` (the evaluation view)."""
    from rayrcm.data.views import eval_transform_uint8

    if not indices:
        return torch.empty((0, 3, size, size), dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    t = eval_transform_uint8(size, large=large, crop_pct=crop_pct)
    images, labels = [], []
    for i in indices:
        try:
            image, label = ds[i]
        except OSError as err:  # an image file that cannot be read (read_image names it)
            raise ConfigError("image", i, (str(err).splitlines() or [type(err).__name__])[0]) from None
        img = t(image)
        images.append(img.expand(3, -1, -1) if img.shape[0] == 1 else img)
        labels.append(int(label))
    return torch.stack(images).contiguous(), torch.tensor(labels, dtype=torch.long)


# ----------------------------------------------------------------------------- digits


def _no_path(path: str | None) -> None:
    return None


_DIGITS_CACHE: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def digits_tensors(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 bundled 8x8 digits as uint8 ``(N, 3, S, S)`` (bilinear resize) and labels."""
    if image_size not in _DIGITS_CACHE:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
        if image_size != 8:
            x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
        _DIGITS_CACHE[image_size] = (x, torch.as_tensor(bunch.target, dtype=torch.long))
    return _DIGITS_CACHE[image_size]


def _load_digits(cfg: DataConfig) -> tuple[Dataset[Any], Dataset[Any], int]:
    x, y = digits_tensors(cfg.image_size)
    pool_idx, test_idx = _split_indices(y.tolist(), 0.2, seed=0)  # fixed 1,437 / 360 split
    return TensorImages(x[pool_idx], y[pool_idx]), TensorImages(x[test_idx], y[test_idx]), 10


DATASETS.register("digits")(DatasetSpec("digits", _load_digits, _no_path))


# ----------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class _CifarLayout:
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    meta_key: str


_CIFAR_LAYOUTS = {
    10: _CifarLayout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                     "batches.meta", "label_names"),
    100: _CifarLayout("cifar-100-python", ("train",), ("test",), "meta", "fine_label_names"),
}


class CifarImages(Dataset[Any]):
    """CIFAR images ``(N, 32, 32, 3)`` uint8 and labels, served as (PIL image, label) as
    torchvision's ``CIFAR10`` / ``CIFAR100`` do (same arrays, labels and class order)."""

    def __init__(self, data: np.ndarray, targets: list[int], classes: list[str]) -> None:
        self.data, self.targets, self.classes = data, targets, classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        from PIL import Image

        return Image.fromarray(self.data[i]), int(self.targets[i])


def _plain_keys(entry: object, file: Path, what: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ConfigError(what, str(file), "not a CIFAR file: expected a dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in entry.items()}


def _read_cifar_batch(file: Path, classes: int) -> tuple[np.ndarray, list[int]]:
    """``(data (N, 32, 32, 3) uint8, labels)`` of one CIFAR batch file, through the restricted unpickler."""
    import numpy as np

    from rayrcm.data.safe_pickle import load_data_pickle

    what = "CIFAR batch file"
    entry = _plain_keys(load_data_pickle(file, what=what), file, what)
    labels = entry.get("labels", entry.get("fine_labels"))
    data = entry.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.size % 3072:
        raise ConfigError(what, str(file), "no uint8 'data' array of N x 3072 pixels")
    data = data.reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
    if not isinstance(labels, (list, tuple, np.ndarray)) or len(labels) != len(data):
        raise ConfigError(what, str(file), f"'labels'/'fine_labels' must list one label per image ({len(data)})")
    try:
        targets = [int(v) for v in labels]
    except (TypeError, ValueError):
        raise ConfigError(what, str(file), "labels must be integers") from None
    bad = [t for t in targets if not 0 <= t < classes]
    if bad:
        raise ConfigError(what, str(file), f"label {bad[0]} outside 0..{classes - 1}")
    return data, targets


def _read_cifar(root: Path, classes: int) -> tuple[Dataset[Any], Dataset[Any]]:
    """torchvision's CIFAR reading, with every file unpickled by the restricted unpickler (no md5
    check of the official archive: CIFAR-format files made elsewhere load too)."""
    import numpy as np

    from rayrcm.data.safe_pickle import load_data_pickle

    layout = _CIFAR_LAYOUTS[classes]
    folder = root / layout.folder
    meta_file = folder / layout.meta
    meta = _plain_keys(load_data_pickle(meta_file, what="CIFAR meta file"), meta_file, "CIFAR meta file")
    names = meta.get(layout.meta_key)
    if not isinstance(names, (list, tuple)) or len(names) != classes:
        raise ConfigError("CIFAR meta file", str(meta_file), f"needs '{layout.meta_key}': a list of {classes} class names")
    names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]

    def split(files: tuple[str, ...]) -> CifarImages:
        parts = [_read_cifar_batch(folder / f, classes) for f in files]
        data = np.ascontiguousarray(np.concatenate([d for d, _ in parts]))
        targets = [t for _, ts in parts for t in ts]
        return CifarImages(data, targets, names)

    return split(layout.train), split(layout.test)


def _cifar(name: str, classes: int) -> DatasetSpec:
    layout = _CIFAR_LAYOUTS[classes]
    folder = layout.folder

    def check(path: str | None) -> None:
        if not path:
            raise ConfigError("data.path", path, f"{name} needs data.path: the folder holding {folder}/")
        root = Path(path).expanduser() / folder
        if not root.is_dir() and Path(path).expanduser().name == folder and Path(path).expanduser().is_dir():
            raise ConfigError("data.path", path, f"is the {folder}/ folder itself: point data.path at its parent, "
                                                 f"{Path(path).expanduser().parent}")
        if not root.is_dir():
            raise ConfigError("data.path", path, f"no {folder}/ folder there (the {name} python format; nothing is downloaded)")
        missing = [f for f in (layout.meta, *layout.train, *layout.test) if not (root / f).is_file()]
        needs = f"{name} needs {layout.meta}, {', '.join(layout.train + layout.test)} in {folder}/"
        if len(missing) == 1:
            raise ConfigError("CIFAR file", str(root / missing[0]), f"missing ({needs})")
        if missing:
            raise ConfigError("CIFAR files", str(root), f"missing {', '.join(missing)} ({needs})")

    def load(cfg: DataConfig) -> tuple[Dataset[Any], Dataset[Any], int]:
        check(cfg.path)
        train, test = _read_cifar(Path(os.path.expanduser(cfg.path or "")), classes)
        return train, test, classes

    return DatasetSpec(name, load, check)


DATASETS.register("cifar10")(_cifar("cifar10", 10))
DATASETS.register("cifar100")(_cifar("cifar100", 100))


# ----------------------------------------------------------------------------- ImageFolder


def _check_folder(path: str | None) -> None:
    if not path:
        raise ConfigError("data.path", path, "imagefolder needs data.path: a folder with train/ and val/ class folders")
    root = Path(path).expanduser()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ConfigError("data.path", path, f"no {split}/ folder there (ImageNet layout: train/<class>/*.JPEG, val/<class>/*.JPEG)")


def read_image(path: str) -> Image.Image:
    """ImageFolder's loader: the RGB PIL image of ``path``; a file PIL cannot read is an ``OSError``
    naming it (a truncated or mislabelled file found after the up-front header check)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... on bad files
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise OSError(f"image file {path!r} cannot be read as an image ({type(err).__name__}: {reason})") from None


def _train_folder(root: Path, cfg: DataConfig) -> Any:  # a torchvision ImageFolder (untyped)
    """``train/`` as an ImageFolder; with ``data.texture_path``, each photo paired with its texture
    (seed 004's texture negatives, :mod:`rayrcm.data.texture`; every pair checked here)."""
    from torchvision.datasets import ImageFolder

    if not cfg.texture_path:
        return ImageFolder(str(root / "train"), loader=read_image)
    from rayrcm.data.texture import TextureFolder, check_texture_pairs

    train = TextureFolder(str(root / "train"), loader=read_image, photo_root=str(root), texture_root=cfg.texture_path)
    check_texture_pairs(train)
    return train


def _load_folder(cfg: DataConfig) -> tuple[Dataset[Any], Dataset[Any], int]:
    from torchvision.datasets import ImageFolder

    root = Path(cfg.path or "").expanduser()
    try:
        train, val = _train_folder(root, cfg), ImageFolder(str(root / "val"), loader=read_image)
    except FileNotFoundError as err:  # a class folder without image files
        raise ConfigError("data.path", cfg.path, (str(err).splitlines() or ["no image files"])[0][:200]) from None
    if train.classes != val.classes:
        raise ConfigError("data.path", cfg.path, "train/ and val/ must hold the same class folders")
    return train, val, len(train.classes)


DATASETS.register("imagefolder")(DatasetSpec("imagefolder", _load_folder, _check_folder, large=True))


# ----------------------------------------------------------------------------- StableRep's caption groups

from rayrcm.data.captions import NATIVE_SIZE, check_csv, load_caption_groups  # noqa: E402

DATASETS.register("caption_groups")(DatasetSpec("caption_groups", partial(load_caption_groups, loader=read_image),
                                                check_csv, large=True, native_size=NATIVE_SIZE))
