"""Where a denoiser comes from: one registry line per source (the cadis objective's ``method.denoiser``
and ``rayrcm certify --denoiser`` name one).

A :class:`DenoiserSource` knows which names are its own (``matches``), refuses a name that cannot
work without touching a file (``check``, one line), loads itself (``load`` -> ``(denoiser, info)``)
and says whether ``certify --denoiser`` may take it (``certify``: a file the job hashes and ships to
its actors; sources fitted or imported at load time are the cadis objective's only). A new source::

    DENOISER_SOURCES.register("mine")(DenoiserSource(lambda s: s.startswith("mine:"), load_mine))

The sources here:

* ``wiener`` / ``wiener_cov``: the closed-form per-pixel / full-covariance Wiener denoisers of
  :mod:`rayrcm.models.denoisers`, fitted on the un-augmented training split of the data config;
* ``adm``: ``adm:module:factory`` with ``denoiser_weights`` and ``denoiser_schedule``, the user's
  installed OpenAI improved/guided-diffusion model (:func:`~rayrcm.models.denoisers.load_diffusion_denoiser`);
* ``file`` (the fallback, any other name): a rayrcm ``model.pt`` of export kind ``denoiser`` (a
  ``ddpm`` run's) or its folder; ``certify`` also takes its run id, ``runs:/`` or ``models:/``
  reference (resolved by the certification job).
"""

from __future__ import annotations

from collections.abc import Callable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from rayrcm.errors import ConfigError
from rayrcm.models.denoisers import (
    CovarianceWienerDenoiser,
    WienerDenoiser,
    denoiser_from_meta,
    load_diffusion_denoiser,
)
from rayrcm.registry import Registry

if TYPE_CHECKING:
    from rayrcm.sections import DataConfig

ADM_PREFIX = "adm:"
REGISTRY_PREFIXES = ("runs:/", "models:/")
Load = Callable[[str, str, str, "DataConfig | None"], tuple[nn.Module, dict[str, Any]]]


def _no_check(source: str, weights: str, schedule: str) -> None:
    return None


@dataclass(frozen=True)
class DenoiserSource:
    matches: Callable[[str], bool]  # whether a name is this source's
    load: Load  # (name, weights, schedule, data config) -> (denoiser, info)
    check: Callable[[str, str, str], None] = _no_check  # a one-line ConfigError, no file access
    certify: bool = False  # `certify --denoiser` takes it
    fallback: bool = False  # matches what no other source does (tried last)


DENOISER_SOURCES: Registry[DenoiserSource] = Registry("denoiser source")


def source_of(name: str) -> tuple[str, DenoiserSource]:
    """The registered source a denoiser name belongs to (a fallback only when no other matches)."""
    entries = [(n, DENOISER_SOURCES.get(n)) for n in DENOISER_SOURCES.names()]
    for key, src in sorted(entries, key=lambda e: e[1].fallback):
        if src.matches(name):
            return key, src
    raise ConfigError("method.denoiser", name, f"names no denoiser source; sources: {', '.join(DENOISER_SOURCES.names())}")


def training_images(data: DataConfig) -> torch.Tensor:
    """The un-augmented training split of data config ``data`` as floats ``(N, C, H, W)`` in [0, 1]."""
    from rayrcm.data import build_splits
    from rayrcm.data.datasets import eval_images

    splits = build_splits(data)
    images, _ = eval_images(splits.train, list(range(len(cast(Sized, splits.train)))), int(data.image_size),
                            large=splits.large, crop_pct=float(data.crop_pct))
    return images.float() / 255


def _wiener(kind: type[WienerDenoiser] | type[CovarianceWienerDenoiser]) -> Load:
    def load(name: str, weights: str, schedule: str, data: DataConfig | None) -> tuple[nn.Module, dict[str, Any]]:
        if data is None:
            raise ConfigError("method.denoiser", name, "needs the training data to fit (no data config given)")
        images = training_images(data)
        return kind.fit(images), {"kind": name, "fit_images": int(images.shape[0])}

    return load


def _check_adm(name: str, weights: str, schedule: str) -> None:
    if not weights:
        raise ConfigError("method.denoiser_weights", weights, f"the state dict file of {name}")
    if not schedule:
        raise ConfigError("method.denoiser_schedule", schedule, "a schedule preset (cifar10-cosine-4000 | "
                          "imagenet-linear-1000)")


def _load_adm(name: str, weights: str, schedule: str, data: DataConfig | None) -> tuple[nn.Module, dict[str, Any]]:
    return load_diffusion_denoiser(name[len(ADM_PREFIX):], weights, schedule)


def _check_file(name: str, weights: str, schedule: str) -> None:
    if name.startswith(REGISTRY_PREFIXES):
        raise ConfigError("method.denoiser", name, "a local model.pt of a ddpm run (registry references are not "
                          "resolved for denoisers yet: download it with mlflow artifacts download)")


def _load_file(name: str, weights: str, schedule: str, data: DataConfig | None) -> tuple[nn.Module, dict[str, Any]]:
    from rayrcm.data.safe_pickle import load_weights_file

    p = Path(name).expanduser()
    if p.is_dir():
        p = p / "model.pt"
    if not p.is_file():
        raise ConfigError("method.denoiser", name, "no such denoiser file (a model.pt of a ddpm run, or its folder)")
    blob = load_weights_file(p, "method.denoiser")
    meta = blob.get("meta") if isinstance(blob, dict) else None
    if not isinstance(meta, dict) or meta.get("export") != "denoiser" or "model" not in blob:
        raise ConfigError("method.denoiser", name, "is not a rayrcm denoiser file (export kind 'denoiser')")
    model = denoiser_from_meta(meta)
    try:
        model.load_state_dict(blob["model"], strict=True)
    except RuntimeError as err:
        raise ConfigError("method.denoiser", name, f"weights do not fit ({str(err).splitlines()[0][:160]})") from None
    return model, {"kind": "ddpm", "file": Path(name).name}


DENOISER_SOURCES.register("wiener")(DenoiserSource(lambda s: s == "wiener", _wiener(WienerDenoiser)))
DENOISER_SOURCES.register("wiener_cov")(DenoiserSource(lambda s: s == "wiener_cov", _wiener(CovarianceWienerDenoiser)))
DENOISER_SOURCES.register("adm")(DenoiserSource(lambda s: s.startswith(ADM_PREFIX), _load_adm, _check_adm))
DENOISER_SOURCES.register("file")(DenoiserSource(lambda s: bool(s), _load_file, _check_file, certify=True, fallback=True))
