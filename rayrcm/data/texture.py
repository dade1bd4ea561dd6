"""Texture-based non-semantic negatives (seed 004, ``moco/loader.py:74-137``): each training photo is
paired with a texture image synthesised from it, and the texture gets the query's augmentation.

Layout. The authors train on ``<root>-texture/<split>/<wnid>/<name>.png`` (224 x 224 textures made by
``preprocess/imangenet_texture_syn.py``) and read each texture's photo at
``path.replace('-texture', '').replace('png', 'JPEG')`` (``loader.py:125``). rayrcm reads it the
other way round: ``data.path`` is the photo folder (``imagefolder``), ``data.texture_path`` the
texture tree, and the texture of ``<data.path>/<split>/<wnid>/<name>.<ext>`` is
``<data.texture_path>/<split>/<wnid>/<name>.png`` (any photo extension; the authors' ``JPEG``).

Augmentation. The authors draw a seed, seed ``random`` and torch with it, augment the query and
the key, seed again with the same value and augment the texture (``loader.py:128-136``): the texture
replays every random draw of the query (crop scale, ratio and position, flip, jitter and its order,
grey, blur and its sigma). The view ``<kind>@texture`` (a :class:`~rayrcm.data.views.PairedView` of
view 0, reading :meth:`TextureFolder.paired_image`) does the same with torch's RNG state; with a
photo and a texture of the same size, the crop box is the same box. The seed's textures are
224 x 224 and its photos are not: there the draws are the same while the box is placed within each
image's own size, as in the seed.

Pairs are checked up front (:func:`check_texture_pairs`): a photo without its texture is one line
naming the missing file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchvision.datasets import ImageFolder

from rayrcm.errors import ConfigError

TEXTURE_EXT = ".png"


def texture_of(photo: str, photo_root: str, texture_root: str) -> str:
    """The texture file of ``photo`` (under ``photo_root``): the same relative path under
    ``texture_root`` with the extension ``.png``."""
    rel = Path(os.path.relpath(photo, Path(photo_root).expanduser()))
    return str(Path(texture_root).expanduser() / rel.with_suffix(TEXTURE_EXT))


class TextureFolder(ImageFolder):  # type: ignore[misc]  # torchvision ships no type information
    """An ``ImageFolder`` of photos (items and labels unchanged) whose ``paired_image(i)`` is photo
    ``i``'s texture, read with the same loader (:class:`~rayrcm.data.views.PairedView` uses it)."""

    def __init__(self, root: str, *, loader: Callable[[str], Any], photo_root: str, texture_root: str) -> None:
        super().__init__(root, loader=loader)
        self.photo_root, self.texture_root = photo_root, texture_root

    def texture_path(self, index: int) -> str:
        return texture_of(str(self.samples[index][0]), self.photo_root, self.texture_root)

    def paired_image(self, index: int) -> Any:
        return self.loader(self.texture_path(index))


def check_texture_pairs(photos: TextureFolder) -> int:
    """Every photo has its texture file; the first missing one is named in one line (with a count of
    the others). A texture that exists but cannot be decoded is named when a worker reads it
    (the loader's ``OSError``). Returns the number of pairs."""
    root = photos.texture_root
    if not Path(root).expanduser().is_dir():
        raise ConfigError("data.texture_path", root,
                          "no such folder (the texture tree <split>/<wnid>/<name>.png of data.path's photos)")
    missing = [p for p in (photos.texture_path(i) for i in range(len(photos.samples))) if not os.path.isfile(p)]
    if missing:
        more = f"; {len(missing) - 1} more photo(s) without a texture" if len(missing) > 1 else ""
        raise ConfigError("texture file", missing[0], f"missing: each photo <split>/<wnid>/<name>.<ext> of data.path "
                          f"needs <split>/<wnid>/<name>.png in data.texture_path{more}")
    return len(photos.samples)


__all__ = ["TEXTURE_EXT", "TextureFolder", "check_texture_pairs", "texture_of"]
