"""Data checks on the driver, before any Ray work: every fault a worker would meet in the data
is one :class:`~rayrcm.errors.ConfigError` line naming the file or the key.

:func:`check_dataset` loads the dataset as the workers will (:func:`~rayrcm.data.build_splits`:
every CIFAR file present and unpickled by the restricted reader, so a missing, truncated or
damaged one is named; a ``data.val_fraction`` the stratified split cannot make is named), reads
the header of every ImageFolder image (:func:`check_images`), and checks the split sizes against
the global batch and the need for validation. Pure Python / PyTorch: no Ray, no MLflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset, Subset

from rayrcm.data.datasets import Splits, _fraction_range, build_splits
from rayrcm.errors import ConfigError
from rayrcm.sections import DataConfig


def image_paths(ds: Dataset[Any]) -> list[str]:
    """The image files behind ``ds`` (a torchvision ``ImageFolder``/``DatasetFolder``, or a
    ``Subset`` of one), in index order; empty for in-memory datasets (digits, CIFAR)."""
    if isinstance(ds, Subset):
        paths = image_paths(ds.dataset)
        return [paths[i] for i in ds.indices] if paths else []
    from torchvision.datasets import DatasetFolder

    return [str(path) for path, _ in ds.samples] if isinstance(ds, DatasetFolder) else []


def _header_error(path: str) -> str | None:
    """Why PIL cannot open ``path`` as an image (None when it can); reads the header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            width, height = im.size
    except UnidentifiedImageError:
        return "not an image: PIL recognises no image format in it"
    except Exception as err:  # noqa: BLE001 - OSError, SyntaxError, DecompressionBombError, ...
        first = (str(err).strip().splitlines() or [""])[0][:160]
        return f"not a readable image ({type(err).__name__}{': ' + first if first else ''})"
    return None if width > 0 and height > 0 else f"an image of {width}x{height} pixels"


def check_images(paths: Sequence[str]) -> int:
    """Open the header of every file in ``paths`` with PIL (``Image.open``: the format and size,
    no pixel is decoded) and name the first bad one, with a count of the others, in one line.

    Every file is checked, not a sample: a header read costs about 35 us from the page cache
    (1,000 ImageNet-sized JPEGs in 0.03-0.04 s), so ImageNet's 1.33M files take under a minute
    when cached, longer on a cold network file system. A file whose header is fine but whose
    pixels are damaged (a truncated JPEG) is found only when a worker decodes it; ImageFolder's
    loader (:func:`rayrcm.data.datasets.read_image`) then raises an ``OSError`` naming the file.
    Returns the number of files checked."""
    bad: list[tuple[str, str]] = []
    for path in paths:
        why = _header_error(path)
        if why is not None:
            bad.append((path, why))
    if bad:
        path, why = bad[0]
        more = f"; {len(bad) - 1} more bad image file(s), e.g. {bad[1][0]}" if len(bad) > 1 else ""
        raise ConfigError("image file", path, f"{why}; remove or replace it{more}")
    return len(paths)


def check_dataset(data: DataConfig, *, batch_size: int, need_val: bool) -> Splits:
    """Every data fault a training worker would meet, as one line, before any Ray work.

    - CIFAR: all missing files named at once (``check_path``), every file unpickled by the
      restricted reader (a truncated or damaged file is named); CIFAR-10 reads in about a second.
    - ``data.val_fraction``: a stratified split with fewer images than classes on a side (or 0
      training images) names the key and the fractions that work; ``need_val`` (the run validates
      or selects its model on the validation split) with 0 validation images names it too.
    - ``batch_size`` (the global batch): an epoch must hold at least one batch (the loader drops
      the last partial batch), so fewer training images than ``batch_size`` names ``data.batch_size``.
    - ImageFolder: the header of every image file, train/ and val/ (:func:`check_images`).

    Returns the splits (so the caller need not load them again, e.g. for the epoch length)."""
    splits = build_splits(data)
    pool = splits.train.dataset if isinstance(splits.train, Subset) else splits.train
    check_images(image_paths(pool) + image_paths(splits.test))
    n_train, n_val = len(splits.train), len(splits.val)  # type: ignore[arg-type]
    held = f" ({n_train + n_val} minus the {n_val} held out by data.val_fraction={data.val_fraction:g})" if n_val else ""
    if need_val and n_val == 0:
        works = _fraction_range(n_train, splits.num_classes) if n_train else None
        fix = f"use data.val_fraction from {works[0]:g} to {works[1]:g}" if works else "this dataset is too small for one"
        raise ConfigError("data.val_fraction", data.val_fraction, f"holds out 0 of the {n_train} training images of "
                          f"{data.name} for validation, and this run needs a validation split; {fix}")
    if n_train < batch_size:
        raise ConfigError("data.batch_size", batch_size, f"larger than the {n_train} training images of {data.name}"
                          f"{held}: an epoch must hold at least one global batch; use data.batch_size <= {n_train}")
    return splits
