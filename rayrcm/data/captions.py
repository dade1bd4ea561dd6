"""StableRep's caption groups (seed 003, ``StableRep/dataset/data.py:41-89``): ``data.name=caption_groups``.

Data. ``data.path`` is a CSV of ``relpath,caption`` rows, read with ``csv.reader`` and kept when the
relative path ends in ``.png``, ``.jpg`` or ``.jpeg`` (``data.py:52-59``; so a header row is skipped).
``data.folders`` lists the image roots, one per generation seed (the authors' ``--folder_list``, e.g.
``<out>/ddim_2.0_seed_<s>``, ``data_generation/txt2img.py:169-176``): row ``r``'s image of root ``j``
is ``<folders[j]>/<relpath_r>``.

Groups. Item ``r`` is one positive group: ``n`` roots are drawn without replacement and the item is
the :class:`~rayrcm.data.views.ImageGroup` of their images, to which
:class:`~rayrcm.data.views.MultiView` applies view ``k`` to image ``k`` (``n = method.n_views``, the
authors' ``--n_img``). Two rows with the same caption are negatives of each other. The authors draw
with ``np.random.choice(len(root_list), n, replace=False)`` (``data.py:74-76``); here the draw is the
first ``n`` of a permutation of the roots from a generator seeded by ``(train.seed, epoch, r)``
(:func:`root_order`), so a resumed run draws what the uninterrupted one drew. The epoch and seed
reach the dataset before each epoch's loader starts (:func:`set_dataset_epoch`, called by the
objective's ``on_epoch``). The label of every row is 0: use ``method.groups=image`` (each item its own
group, the authors' pseudo-labels ``arange(B) + rank * B``).

Checks before any worker starts: a missing CSV, a CSV without image rows, a missing root and a
missing image file (every row in every root) are each one line naming the file or folder.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from rayrcm.data.views import ImageGroup
from rayrcm.errors import ConfigError
from rayrcm.sections import DataConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # data.py:57 (case-sensitive, as there)
NATIVE_SIZE = 224  # the authors' crop (main_stablerep.py:185)


@dataclass(frozen=True)
class CaptionRow:
    relpath: str
    caption: str


def read_caption_csv(path: str | os.PathLike[str]) -> list[CaptionRow]:
    """The ``relpath,caption`` rows of the CSV at ``path`` whose path ends in an image suffix."""
    rows: list[CaptionRow] = []
    try:
        with open(Path(path).expanduser(), newline="", encoding="utf-8") as f:
            for row in csv.reader(f):
                if len(row) >= 2 and row[0].endswith(IMAGE_SUFFIXES):
                    rows.append(CaptionRow(row[0], row[1]))
    except UnicodeDecodeError as err:
        raise ConfigError("caption file", str(path), f"is not UTF-8 text (byte {err.start}: {err.reason}); "
                          "save it as UTF-8") from None
    return rows


def root_order(seed: int, epoch: int, index: int, n_roots: int) -> list[int]:
    """A permutation of ``range(n_roots)``, a pure function of ``(seed, epoch, index)``: its first ``n``
    are item ``index``'s roots in ``epoch`` (``n`` drawn without replacement)."""
    key = ((seed * 1_000_003 + epoch) * 2_147_483_647 + index) % (2**63 - 1)
    return torch.randperm(n_roots, generator=torch.Generator().manual_seed(key)).tolist()


class CaptionGroups(Dataset[Any]):
    """Rows of a caption CSV, each the group of its images in the drawn roots (label 0); ``loader``
    reads an image file (:func:`rayrcm.data.datasets.read_image`: RGB, a bad file named)."""

    def __init__(self, rows: list[CaptionRow], roots: list[str], loader: Callable[[str], Any]) -> None:
        self.rows, self.roots, self.loader = rows, [str(Path(r).expanduser()) for r in roots], loader
        self.labels = [0] * len(rows)
        self.epoch, self.seed = 0, 0

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int, seed: int) -> None:
        self.epoch, self.seed = int(epoch), int(seed)

    def draw(self, index: int) -> list[int]:
        """The order of the roots for item ``index`` in the current epoch."""
        return root_order(self.seed, self.epoch, index, len(self.roots))

    def paths(self, index: int) -> list[str]:
        rel = self.rows[index].relpath
        return [os.path.join(self.roots[j], rel) for j in self.draw(index)]

    def __getitem__(self, index: int) -> tuple[ImageGroup, int]:
        return ImageGroup(self.paths(index), self.loader), 0


class NoImages(Dataset[Any]):
    """The empty test split of a dataset without one."""

    def __len__(self) -> int:
        return 0

    def __getitem__(self, index: int) -> Any:
        raise IndexError(index)


def set_dataset_epoch(ds: Any, epoch: int, seed: int) -> None:
    """Call ``set_epoch(epoch, seed)`` on every dataset in the wrapper chain of ``ds``
    (``MultiView.base``, ``Subset.dataset``) that has one."""
    seen: set[int] = set()
    while ds is not None and id(ds) not in seen:
        seen.add(id(ds))
        if isinstance(ds, CaptionGroups):
            ds.set_epoch(epoch, seed)
        inner = getattr(ds, "base", None)
        ds = inner if inner is not None else getattr(ds, "dataset", None)


def check_csv(path: str | None) -> None:
    if not path:
        raise ConfigError("data.path", path, "caption_groups needs data.path: a CSV of relpath,caption rows")
    if not Path(path).expanduser().is_file():
        raise ConfigError("data.path", path, "no such CSV file (caption_groups reads relpath,caption rows)")


def _check_roots(cfg: DataConfig) -> None:
    if not cfg.folders:
        raise ConfigError("data.folders", cfg.folders, "caption_groups needs the image roots, one per generation seed")
    for root in cfg.folders:
        if not Path(root).expanduser().is_dir():
            raise ConfigError("data.folders", root, "no such folder (one image root per generation seed)")


def _check_files(ds: CaptionGroups) -> None:
    """Every row's image in every root exists; the first missing one named, with a count of the others."""
    missing = [os.path.join(root, row.relpath) for root in ds.roots for row in ds.rows
               if not os.path.isfile(os.path.join(root, row.relpath))]
    if missing:
        more = f"; {len(missing) - 1} more missing" if len(missing) > 1 else ""
        raise ConfigError("image file", missing[0], f"missing: every CSV row needs its image in every root of "
                          f"data.folders{more}")


def load_caption_groups(cfg: DataConfig, *, loader: Callable[[str], Any]) -> tuple[Dataset[Any], Dataset[Any], int]:
    """The caption groups of ``data.path`` over ``data.folders`` (no test split: an empty one), 1 class."""
    check_csv(cfg.path)
    _check_roots(cfg)
    rows = read_caption_csv(cfg.path or "")
    if not rows:
        raise ConfigError("data.path", cfg.path,
                          f"no relpath,caption rows with a path ending in {', '.join(IMAGE_SUFFIXES)}")
    ds = CaptionGroups(rows, list(cfg.folders), loader)
    _check_files(ds)
    return ds, NoImages(), 1


__all__ = ["CaptionGroups", "CaptionRow", "NoImages", "check_csv", "load_caption_groups", "read_caption_csv",
           "root_order", "set_dataset_epoch"]
