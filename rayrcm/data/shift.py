"""Released corruption and distribution-shift sets, read from a user's folder (never downloaded).

Formats (``METHODS.md`` section 4; Hendrycks & Dietterich 2019 for CIFAR-10-C / ImageNet-C,
Recht et al. 2018 for CIFAR-10.1, Wang et al. 2019 ImageNet-Sketch, Hendrycks et al. 2021
ImageNet-R, Geirhos et al. 2019 Stylized-ImageNet):

- CIFAR-10-C / CIFAR-100-C (:func:`read_cifar_c`): ``<corruption>.npy``, uint8 ``(50000, 32, 32, 3)``,
  severities 1-5 in consecutive blocks of 10,000 (``make_cifar_c.py``), plus ``labels.npy``
  (50,000 labels: the test labels five times). Read with ``numpy.load(allow_pickle=False,
  mmap_mode='r')``: a severity block is a view of the file, never a copy of all five.
- CIFAR-10.1 (:func:`read_cifar10_1`): ``cifar10.1_v6_data.npy`` uint8 ``(2000, 32, 32, 3)`` and
  ``cifar10.1_v6_labels.npy`` (2,000 labels in CIFAR-10's class order).
- ImageNet-C (:func:`read_imagenet_c`): ``<corruption>/<severity>/<wnid>/*.JPEG``.
- Class folders (:func:`read_shift_folder`): ImageNet-Sketch (``sketch/<wnid>/``, 50 images per class),
  ImageNet-R (``imagenet-r/<wnid>/``, 200 classes: logits masked to the classes present),
  Stylized-ImageNet (user-made with AdaIN, ``<wnid>/`` folders, e.g. its ``val/``).

Folder sets are restricted to the model's class list (``classes``, in the model's output order,
e.g. the ImageNet-100 wnids as the training ImageFolder sorted them): a set's folder outside the
list is dropped, a class of the list with no folder is absent, and :class:`ShiftSet` says how many
classes remain. Every dataset here yields (raw image, label) like :mod:`rayrcm.data.datasets`, so
:func:`rayrcm.data.datasets.eval_images` turns it into the evaluation view. Every fault is one
:class:`~rayrcm.errors.ConfigError` line naming the file or folder. Pure: no Ray, no MLflow.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from rayrcm.errors import ConfigError

if TYPE_CHECKING:
    from PIL import Image


CIFAR_C_SEVERITIES = 5
CIFAR_C_IMAGES = 50_000  # 5 severities x 10,000 test images in the released files

# Folder sets: name -> (what the folder holds, whether logits are masked to the classes present)
FOLDER_SETS: dict[str, tuple[str, bool]] = {
    "imagenet-sketch": ("ImageNet-Sketch: 50,000 sketches, 50 per class, in 1,000 wnid folders", False),
    "imagenet-r": ("ImageNet-R: 30,000 renditions of 200 classes in wnid folders", True),
    "stylized-imagenet": ("Stylized-ImageNet (AdaIN-stylised ImageNet) in wnid folders", False),
}

# ``rayrcm evaluate --shift NAME=PATH``: NAME -> the set's name in results (rayrcm.analysis.robustness.SHIFT_SETS)
SHIFT_ALIASES = {"cifar10.1": "cifar10.1", "sketch": "imagenet-sketch", "r": "imagenet-r",
                 "stylized": "stylized-imagenet", **{name: name for name in FOLDER_SETS}}


def parse_shift(item: str) -> tuple[str, str]:
    """``NAME=PATH`` (NAME in :data:`SHIFT_ALIASES`) -> ``(set name, path)``; anything else is one line."""
    name, sep, path = item.partition("=")
    name = SHIFT_ALIASES.get(name.strip().lower(), "")
    if not (sep and path.strip() and name):
        raise ConfigError("shift", item, "give NAME=PATH with NAME one of: cifar10.1, sketch, r, stylized")
    return name, path.strip()


class NpyImages(Dataset[Any]):
    """uint8 images ``(N, H, W, 3)`` (an array or a memory map) and integer labels, served as
    (PIL image, label) as :class:`rayrcm.data.datasets.CifarImages` does."""

    def __init__(self, data: np.ndarray, targets: np.ndarray, name: str) -> None:
        self.data, self.targets, self.name = data, targets, name

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        from PIL import Image

        return Image.fromarray(np.asarray(self.data[i])), int(self.targets[i])


def _load_npy(path: Path, what: str) -> np.ndarray:
    """``numpy.load(path, mmap_mode='r', allow_pickle=False)``; a missing or unreadable file is one line."""
    if not path.is_file():
        raise ConfigError(what, str(path), "missing (nothing is downloaded: put the released file there)")
    try:
        return cast(np.ndarray, np.load(path, mmap_mode="r", allow_pickle=False))
    except (ValueError, OSError, EOFError) as err:  # pickled object arrays, truncated or non-.npy files
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ConfigError(what, str(path), f"not a readable .npy array ({reason})") from None


def _check_images(arr: np.ndarray, path: Path, what: str, shape: str) -> None:
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] != 3 or len(arr) == 0:
        raise ConfigError(what, str(path), f"expected uint8 {shape}, got {arr.dtype} {tuple(arr.shape)}")


def _check_labels(labels: np.ndarray, path: Path, n: int | tuple[int, ...], num_classes: int) -> np.ndarray:
    sizes = (n,) if isinstance(n, int) else n
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) not in sizes:
        want = " or ".join(str(s) for s in sizes)
        raise ConfigError("labels file", str(path), f"expected {want} integer labels, got {labels.dtype} "
                          f"{tuple(labels.shape)}")
    labels = np.asarray(labels, dtype=np.int64)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise ConfigError("labels file", str(path), f"label {int(bad[0])} outside 0..{num_classes - 1}")
    return labels


def _folder(root: str | os.PathLike[str], what: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise ConfigError("data.path", str(root), f"no such folder ({what}; nothing is downloaded)")
    return path


# ----------------------------------------------------------------------------- CIFAR-10-C, CIFAR-10.1


def cifar_c_corruptions(root: str | os.PathLike[str]) -> list[str]:
    """The corruption names of a CIFAR-10-C / CIFAR-100-C folder (its ``.npy`` files but ``labels``)."""
    path = _folder(root, "a CIFAR-C folder of <corruption>.npy files and labels.npy")
    return sorted(p.stem for p in path.glob("*.npy") if p.stem != "labels")


def read_cifar_c(root: str | os.PathLike[str], corruption: str, severity: int, *, num_classes: int = 10) -> NpyImages:
    """Severity ``severity``'s block of ``<root>/<corruption>.npy`` with its labels (``num_classes``:
    10 for CIFAR-10-C, 100 for CIFAR-100-C). The file holds 5 equal blocks, severity 1 first
    (released: 50,000 images, blocks of 10,000); ``labels.npy`` has one label per image (or per
    block). The images stay memory-mapped."""
    path = _folder(root, "a CIFAR-C folder of <corruption>.npy files and labels.npy")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise ConfigError("severity", severity, "must be an integer from 1 to 5")
    file = path / f"{corruption}.npy"
    if not file.is_file():
        found = cifar_c_corruptions(path)
        raise ConfigError("CIFAR-C file", str(file), f"missing: no {corruption}.npy in that folder (found: "
                          f"{', '.join(found) if found else 'no .npy files'})")
    images = _load_npy(file, "CIFAR-C file")
    _check_images(images, file, "CIFAR-C file", f"(N, 32, 32, 3) with N = 5 x images per severity ({CIFAR_C_IMAGES})")
    if len(images) % CIFAR_C_SEVERITIES:
        raise ConfigError("CIFAR-C file", str(file), f"{len(images)} images do not split into 5 severity blocks "
                          f"(released: {CIFAR_C_IMAGES})")
    block = len(images) // CIFAR_C_SEVERITIES
    labels_file = path / "labels.npy"
    labels = _check_labels(_load_npy(labels_file, "labels file"), labels_file, (len(images), block), num_classes)
    part = slice((severity - 1) * block, severity * block)
    return NpyImages(images[part], labels[part] if len(labels) == len(images) else labels,
                     f"{path.name}/{corruption}/{severity}")


def read_cifar10_1(root: str | os.PathLike[str], *, version: str = "v6") -> NpyImages:
    """CIFAR-10.1 (``cifar10.1_<version>_data.npy`` and ``..._labels.npy``; v6: 2,000 images)."""
    path = _folder(root, f"a folder with cifar10.1_{version}_data.npy and cifar10.1_{version}_labels.npy")
    data_file, labels_file = path / f"cifar10.1_{version}_data.npy", path / f"cifar10.1_{version}_labels.npy"
    images = _load_npy(data_file, "CIFAR-10.1 file")
    _check_images(images, data_file, "CIFAR-10.1 file", "(N, 32, 32, 3) (v6: N = 2000)")
    labels = _check_labels(_load_npy(labels_file, "labels file"), labels_file, len(images), 10)
    return NpyImages(images, labels, f"cifar10.1-{version}")


# ----------------------------------------------------------------------------- class folders


def read_class_list(path: str | os.PathLike[str]) -> list[str]:
    """A class list file: one name (e.g. a wnid) per line, in the model's output order; blank lines
    and ``#`` comments are skipped; a repeated name is an error."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError("data.classes", str(path), "no such file (one class name, e.g. a wnid, per line)")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError("data.classes", str(path), f"is not UTF-8 text (byte {err.start}: {err.reason}); "
                          "save it as UTF-8") from None
    names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    names = [n for n in names if n]
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ConfigError("data.classes", str(path), f"class {n!r} is listed twice")
        seen.add(n)
    if not names:
        raise ConfigError("data.classes", str(path), "lists no class")
    return names


def model_classes(ds: Dataset[Any], class_list: str, num_classes: int) -> tuple[str, ...]:
    """The model's classes in output order: the ``class_list`` file (``data.classes``), else the class
    folders of its evaluation dataset ``ds`` (an ImageFolder, or a Subset of one); one-line errors."""
    classes: Sequence[str] | None
    if class_list:
        classes = read_class_list(class_list)
    else:
        classes = getattr(ds, "classes", None) or getattr(getattr(ds, "dataset", None), "classes", None)
        if not classes:
            raise ConfigError("class_list", "", "the dataset names no classes: give a class list file "
                              "(one wnid per line, in the model's output order)")
    if len(classes) != num_classes:
        raise ConfigError("class_list", class_list, f"lists {len(classes)} classes; the model has {num_classes}")
    return tuple(str(c) for c in classes)


class ClassFolder(ImageFolder):  # type: ignore[misc]  # torchvision ships no type information
    """An ImageFolder reading only the class folders in ``class_to_idx`` (label = the model's index
    of that class, possibly non-contiguous); a listed class without images is skipped."""

    def __init__(self, root: str, class_to_idx: dict[str, int]) -> None:
        from rayrcm.data.datasets import read_image

        self._wanted = dict(class_to_idx)
        super().__init__(root, loader=read_image, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return sorted(self._wanted), dict(self._wanted)


@dataclass(frozen=True)
class ShiftSet:
    """A folder set restricted to the model's classes: ``dataset`` yields (image, model class index)."""

    name: str
    dataset: ClassFolder
    classes: tuple[str, ...]  # the model's classes, in output order
    present: tuple[int, ...]  # indices into ``classes`` with at least one image in the set
    extra: tuple[str, ...]  # the set's class folders outside ``classes`` (not read)
    masked: bool  # logits are masked to ``present`` (ImageNet-R's protocol)

    @property
    def missing(self) -> tuple[str, ...]:
        """The model's classes with no image in the set."""
        have = set(self.present)
        return tuple(c for i, c in enumerate(self.classes) if i not in have)

    def summary(self) -> str:
        """One line: how many of the model's classes remain, images, folders left out."""
        line = (f"{self.name}: {len(self.present)} of {len(self.classes)} classes, {len(self.dataset):,} images"
                + (", logits masked to those classes" if self.masked else ""))
        if self.extra:
            line += f"; {len(self.extra)} class folder(s) outside the class list not read"
        return line

    def record(self, path: str) -> dict[str, object]:
        """What a job's protocol records of the set: its folder, classes remaining (of the model's), images."""
        return {"path": path, "classes": len(self.present), "of": len(self.classes), "masked": self.masked,
                "images": len(self.dataset)}

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` ``(B, len(classes))`` as the set's protocol scores them (masked or not)."""
        return mask_logits(logits, self.present) if self.masked else logits


def mask_logits(logits: torch.Tensor, present: Sequence[int]) -> torch.Tensor:
    """``(B, K)`` logits with every class not in ``present`` set to ``-inf`` (argmax among present)."""
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[torch.as_tensor(list(present), dtype=torch.long, device=logits.device)] = True
    return logits.masked_fill(~keep, float("-inf"))


def _read_folder(path: Path, name: str, classes: Sequence[str] | None, masked: bool) -> ShiftSet:
    folders = sorted(e.name for e in os.scandir(path) if e.is_dir())
    classes = tuple(folders if classes is None else classes)
    if len(set(classes)) != len(classes):
        raise ConfigError("data.classes", name, "a class is listed twice")
    have = set(folders)
    kept = {c: i for i, c in enumerate(classes) if c in have}
    if not kept:
        raise ConfigError("data.path", str(path), f"none of the {len(classes)} classes has a folder there "
                          f"(found {len(folders)} folder(s), e.g. {folders[0] if folders else 'none'})")
    dataset = ClassFolder(str(path), kept)
    if len(dataset) == 0:
        raise ConfigError("data.path", str(path), f"no image files in the {len(kept)} class folder(s) of {name}")
    present = tuple(sorted(set(dataset.targets)))
    extra = tuple(f for f in folders if f not in set(classes))
    return ShiftSet(name, dataset, classes, present, extra, masked)


def read_shift_folder(name: str, root: str | os.PathLike[str], *, classes: Sequence[str] | None = None) -> ShiftSet:
    """A class-folder set (``name`` in :data:`FOLDER_SETS`) restricted to ``classes`` (the model's
    class list in output order; None: the set's own folders, sorted, as ImageFolder does)."""
    if name not in FOLDER_SETS:
        raise ConfigError("shift set", name, f"choose one of: {', '.join(FOLDER_SETS)}")
    what, masked = FOLDER_SETS[name]
    return _read_folder(_folder(root, what), name, classes, masked)


def imagenet_c_corruptions(root: str | os.PathLike[str]) -> list[str]:
    """The corruption names of an ImageNet-C folder: its sub-folders holding a ``1``-``5`` severity folder."""
    path = _folder(root, "ImageNet-C: <corruption>/<severity>/<wnid>/ folders")
    return sorted(e.name for e in os.scandir(path)
                  if e.is_dir() and any((Path(e.path) / str(s)).is_dir() for s in range(1, 6)))


def read_imagenet_c(root: str | os.PathLike[str], corruption: str, severity: int, *,
                    classes: Sequence[str] | None = None) -> ShiftSet:
    """``<root>/<corruption>/<severity>/<wnid>/`` of ImageNet-C, restricted to ``classes``."""
    path = _folder(root, "ImageNet-C: <corruption>/<severity>/<wnid>/ folders")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise ConfigError("severity", severity, "must be an integer from 1 to 5")
    if not (path / corruption).is_dir():
        found = sorted(e.name for e in os.scandir(path) if e.is_dir())
        raise ConfigError("ImageNet-C folder", str(path / corruption), f"missing (found: {', '.join(found) or 'none'})")
    sub = path / corruption / str(severity)
    if not sub.is_dir():
        raise ConfigError("ImageNet-C folder", str(sub), "missing: no folder for that severity")
    return _read_folder(sub, f"imagenet-c/{corruption}/{severity}", classes, False)
