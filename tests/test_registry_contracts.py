"""Contracts of the registries that have no suite of their own: every export kind rayrcm registers
(:data:`rayrcm.models.export.EXPORTS`) saves and rebuilds from its meta with identical outputs, and
every dataset (:data:`rayrcm.data.datasets.DATASETS`) gives, from a tiny instance the test writes
itself, images in [0, 1] of the asked size with 3 channels and labels within ``num_classes``; a
bad path or name is one :class:`~rayrcm.errors.ConfigError` line. A kind or dataset added to
rayrcm without a case here fails :func:`test_every_builtin_entry_has_a_case`."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rayrcm.config import ExperimentConfig, apply_overrides, to_dict, validate
from rayrcm.data.datasets import DATASETS, build_splits
from rayrcm.data.views import ImageGroup, build_transform
from rayrcm.errors import ConfigError
from rayrcm.models.export import EXPORTS, build_from_file
from rayrcm.sections import DataConfig
from rayrcm.train.checkpoint import model_meta, save_model

TINY = ["data.image_size=8", "model.patch_size=4"]


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def _denoise(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x, 0.25)  # the denoiser interface: forward(y, sigma)


# kind -> (the config overrides of a tiny model of that kind, how it is called on (B, 3, 8, 8) images)
EXPORT_CASES: dict[str, tuple[list[str], Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]]] = {
    "encoder": (["method.name=gaussian", *TINY], _forward),
    "classifier": (["method.name=gaussian", *TINY], _forward),
    "denoiser": (["method.name=ddpm", "method.base_channels=4", "method.steps=100", "method.channel_mults=1",
                  "data.image_size=8"], _denoise),
    "denoised_classifier": (["method.name=cadis", "method.sigma=0.5", "method.denoiser=wiener", *TINY], _forward),
}


def _module_of(fn: Any) -> str:
    return str(getattr(getattr(fn, "func", fn), "__module__", ""))  # functools.partial: its function's module


def test_every_builtin_entry_has_a_case():
    """Entries registered by rayrcm itself (test plugins register more in the same process)."""
    assert {k for k in EXPORTS.names() if _module_of(EXPORTS.get(k).build).startswith("rayrcm.")} == set(EXPORT_CASES)
    assert {n for n in DATASETS.names() if _module_of(DATASETS.get(n).load).startswith("rayrcm.")} == set(DATASET_CASES)


@pytest.mark.parametrize("kind", sorted(EXPORT_CASES))
def test_an_export_kind_saves_and_rebuilds_with_identical_outputs(kind, tmp_path):
    overrides, call = EXPORT_CASES[kind]
    meta = model_meta(to_dict(apply_overrides(ExperimentConfig(), overrides)), kind, 10)
    torch.manual_seed(0)
    model = EXPORTS.get(kind).build(meta).eval()
    with torch.no_grad():  # away from any initialisation (zero-initialised layers too): only the file's weights match
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(tmp_path / "model.pt", model, meta)
    torch.manual_seed(1)
    back, got = build_from_file(tmp_path / "model.pt")
    assert got["export"] == kind and type(back) is type(model)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, again = call(model, x), call(back.eval(), x)
    assert torch.equal(out, again)
    if EXPORTS.get(kind).predicts_classes:
        assert out.shape == (2, 10)


# ----------------------------------------------------------------------------- datasets


def _digits(root: Path) -> DataConfig:
    return DataConfig(name="digits", image_size=8)


def _write_cifar(root: Path, folder: str, batches: list[str], meta: str, meta_key: str, label_key: str,
                 classes: int, n: int) -> None:
    (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for b, name in enumerate(batches):
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: [(b * n + i) % classes for i in range(n)]}
        (root / folder / name).write_bytes(pickle.dumps(batch))
    (root / folder / meta).write_bytes(pickle.dumps({meta_key: [f"c{i}" for i in range(classes)]}))


def _cifar10(root: Path) -> DataConfig:
    _write_cifar(root, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "batches.meta",
                 "label_names", "labels", 10, 4)
    return DataConfig(name="cifar10", path=str(root), image_size=8, val_fraction=0.0)


def _cifar100(root: Path) -> DataConfig:
    _write_cifar(root, "cifar-100-python", ["train", "test"], "meta", "fine_label_names", "fine_labels", 100, 6)
    return DataConfig(name="cifar100", path=str(root), image_size=8, val_fraction=0.0)


def _png(path: Path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 10, 3), value, np.uint8)).save(path)


def _imagefolder(root: Path) -> DataConfig:
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog")):
            for i in range(2):
                _png(root / split / name / f"{i}.png", 60 * c + 20 * i)
    return DataConfig(name="imagefolder", path=str(root), image_size=8, val_fraction=0.0)


def _caption_groups(root: Path) -> DataConfig:
    roots = [root / f"seed_{j}" for j in range(2)]
    for j, r in enumerate(roots):
        for i in range(3):
            _png(r / f"{i:05d}.png", 40 * j + 10 * i)
    (root / "captions.csv").write_text("relpath,caption\n" + "".join(f"{i:05d}.png,a photo {i}\n" for i in range(3)))
    return DataConfig(name="caption_groups", path=str(root / "captions.csv"), folders=tuple(map(str, roots)),
                      image_size=8, val_fraction=0.0)


DATASET_CASES: dict[str, Callable[[Path], DataConfig]] = {
    "digits": _digits, "cifar10": _cifar10, "cifar100": _cifar100, "imagefolder": _imagefolder,
    "caption_groups": _caption_groups,
}


@pytest.mark.parametrize("name", sorted(DATASET_CASES))
def test_a_dataset_gives_images_in_range_of_its_size_and_labels_within_its_classes(name, tmp_path):
    cfg = DATASET_CASES[name](tmp_path)
    splits = build_splits(cfg)
    view = build_transform("none", cfg.image_size, large=splits.large)
    seen = 0
    for ds in (splits.train, splits.test):
        for i in range(min(len(ds), 6)):
            image, label = ds[i]
            for raw in (list(image) if isinstance(image, ImageGroup) else [image]):
                x = view(raw)
                assert x.dtype == torch.float32 and tuple(x.shape) == (3, cfg.image_size, cfg.image_size)
                assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
            assert isinstance(label, int) and 0 <= label < splits.num_classes
            seen += 1
    assert seen > 0


@pytest.mark.parametrize("name", sorted(n for n in DATASET_CASES if n != "digits"))  # digits reads no path
def test_a_dataset_at_a_bad_path_fails_in_one_line(name, tmp_path):
    cfg = DATASET_CASES[name](tmp_path / "made")
    for path in (str(tmp_path / "nowhere"), None):
        with pytest.raises(ConfigError) as err:
            build_splits(replace(cfg, path=path))
        assert err.value.key == "data.path" and "\n" not in str(err.value)


def test_an_unknown_dataset_name_fails_in_one_line():
    with pytest.raises(ConfigError) as err:
        validate(apply_overrides(ExperimentConfig(), ["data.name=nosuch"]), check_paths=False)
    assert err.value.key == "data.name" and "digits" in str(err.value) and "\n" not in str(err.value)
