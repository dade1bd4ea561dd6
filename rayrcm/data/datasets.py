"""Dataset registry: the bundled ``digits`` default, CIFAR-10/100 on disk, ImageNet-style folders.

Every dataset gives raw images (uint8 tensors or PIL images) and integer labels; the view
transforms in :mod:`rayrcm.data.views` turn them into float tensors in [0, 1]. Nothing is ever
downloaded: CIFAR and ImageFolder data are read from ``data.path``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from rayrcm.errors import ConfigError
from rayrcm.registry import Registry
from rayrcm.sections import DataConfig


@dataclass(frozen=True)
class Splits:
    """Train / validation (held out from train) / test datasets of (raw image, label)."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    large: bool  # ImageNet-style crops (RandomResizedCrop) rather than pad-and-crop


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    load: Callable[[DataConfig], tuple[Dataset, Dataset, int]]  # (train+val pool, test, classes)
    check_path: Callable[[str | None], None]
    large: bool = False


DATASETS: Registry[DatasetSpec] = Registry("dataset")


class TensorImages(Dataset):
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


def _labels_of(ds: Dataset) -> list[int]:
    for attr in ("labels", "targets"):
        if hasattr(ds, attr):
            return [int(v) for v in getattr(ds, attr)]
    return [int(ds[i][1]) for i in range(len(ds))]


def build_splits(cfg: DataConfig) -> Splits:
    """Load ``cfg.name`` and hold out a stratified validation split (fixed seed) from train."""
    spec = DATASETS.get(cfg.name)
    spec.check_path(cfg.path)
    pool, test, num_classes = spec.load(cfg)
    train_idx, val_idx = _split_indices(_labels_of(pool), cfg.val_fraction, seed=1)
    return Splits(Subset(pool, train_idx), Subset(pool, val_idx), test, num_classes, spec.large)


def eval_split(cfg: DataConfig, split: str) -> tuple[Dataset, int, bool]:
    """``(dataset, num_classes, large)`` for ``split`` in ``test`` / ``val`` (the held-out part of train)."""
    splits = build_splits(cfg)
    return (splits.test if split == "test" else splits.val), splits.num_classes, splits.large


def eval_images(ds: Dataset, indices: list[int], size: int, *, large: bool = False,
                crop_pct: float = 0.875) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``(K, C, size, size)`` and labels ``(K,)`` of ``ds[indices]`` (the evaluation view)."""
    from rayrcm.data.views import eval_transform_uint8

    if not indices:
        return torch.empty((0, 3, size, size), dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    t = eval_transform_uint8(size, large=large, crop_pct=crop_pct)
    images, labels = [], []
    for i in indices:
        image, label = ds[i]
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


def _load_digits(cfg: DataConfig) -> tuple[Dataset, Dataset, int]:
    x, y = digits_tensors(cfg.image_size)
    pool_idx, test_idx = _split_indices(y.tolist(), 0.2, seed=0)  # fixed 1,437 / 360 split
    return TensorImages(x[pool_idx], y[pool_idx]), TensorImages(x[test_idx], y[test_idx]), 10


DATASETS.register("digits")(DatasetSpec("digits", _load_digits, _no_path))


# ----------------------------------------------------------------------------- CIFAR


def _cifar(name: str, folder: str, classes: int) -> DatasetSpec:
    def check(path: str | None) -> None:
        if not path:
            raise ConfigError("data.path", path, f"{name} needs data.path: the folder holding {folder}/")
        if not (Path(path).expanduser() / folder).is_dir():
            raise ConfigError("data.path", path, f"no {folder}/ folder there (torchvision's {name} format; nothing is downloaded)")

    def load(cfg: DataConfig) -> tuple[Dataset, Dataset, int]:
        from torchvision import datasets

        base = datasets.CIFAR10 if classes == 10 else datasets.CIFAR100

        class cls(base):  # type: ignore[valid-type,misc]
            """torchvision's reader without the md5 check of the official archive: CIFAR-format
            files made elsewhere load too; a damaged file still fails when unpickled."""

            def _check_integrity(self) -> bool:
                folder = Path(self.root) / self.base_folder
                return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

            def _load_meta(self) -> None:
                import pickle

                with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
                    self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
                self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

        root = os.path.expanduser(cfg.path or "")
        return cls(root, train=True, download=False), cls(root, train=False, download=False), classes

    return DatasetSpec(name, load, check)


DATASETS.register("cifar10")(_cifar("cifar10", "cifar-10-batches-py", 10))
DATASETS.register("cifar100")(_cifar("cifar100", "cifar-100-python", 100))


# ----------------------------------------------------------------------------- ImageFolder


def _check_folder(path: str | None) -> None:
    if not path:
        raise ConfigError("data.path", path, "imagefolder needs data.path: a folder with train/ and val/ class folders")
    root = Path(path).expanduser()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ConfigError("data.path", path, f"no {split}/ folder there (ImageNet layout: train/<class>/*.JPEG, val/<class>/*.JPEG)")


def _load_folder(cfg: DataConfig) -> tuple[Dataset, Dataset, int]:
    from torchvision.datasets import ImageFolder

    root = Path(cfg.path or "").expanduser()
    train, val = ImageFolder(str(root / "train")), ImageFolder(str(root / "val"))
    if train.classes != val.classes:
        raise ConfigError("data.path", cfg.path, "train/ and val/ must hold the same class folders")
    return train, val, len(train.classes)


DATASETS.register("imagefolder")(DatasetSpec("imagefolder", _load_folder, _check_folder, large=True))
