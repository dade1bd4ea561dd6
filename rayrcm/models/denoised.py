"""A classifier behind a frozen denoiser: ``f(D(y, sigma))``, the base classifier of denoised smoothing.

Randomized smoothing certifies any base classifier; DDS (Carlini et al., "(Certified!!) Adversarial
Robustness for Free!", ICLR 2023) and FT-CADIS (Jang et al., "Confidence-aware Denoised Fine-tuning
of Off-the-shelf Models for Certified Robustness", TMLR 2024) certify ``y -> f(D(y, sigma))`` with
``y = x + sigma z`` drawn by the smoothing loop. :class:`DenoisedClassifier` is that composite.

**The denoiser is not part of the model's weights.** It is held outside the module tree (no
submodule, no parameter, no buffer), so ``state_dict()``, ``parameters()``, DDP and every
checkpoint see the classifier only (``classifier.*`` keys); a 2.2 GB diffusion model is never copied
into a checkpoint. ``.to()`` / ``.cuda()`` / ``.half()`` still move it, and it stays in eval mode
and frozen whatever ``train()`` is called with. Gradients flow through it to the input (attacks on
the composite work); its own parameters never require grad.

The denoiser is rebuilt from its **source**, recorded in the training config (``method.denoiser``
of the ``cadis`` objective, see :func:`load_denoiser`):

* ``wiener`` / ``wiener_cov``: the closed-form per-pixel / full-covariance Wiener denoiser of
  :mod:`rayrcm.models.denoisers`, fitted on the un-augmented training split of ``data`` (the same
  split every time: a fixed seed), so rebuilding a file refits it from the dataset;
* a path to a rayrcm ``model.pt`` of export kind ``denoiser`` (the ``ddpm`` objective), or a folder
  holding one;
* ``adm:module:factory`` with ``denoiser_weights`` (a state dict file) and ``denoiser_schedule``
  (a preset of :data:`~rayrcm.models.denoisers.SCHEDULE_PRESETS`): the user's installed OpenAI
  improved/guided-diffusion model (:func:`~rayrcm.models.denoisers.load_diffusion_denoiser`).

``sigma`` is the pixel noise level the denoiser is told (the training sigma in a file; set
``model.sigma`` to certify at another level).
"""

from __future__ import annotations

from collections.abc import Mapping, Sized
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

if TYPE_CHECKING:
    from rayrcm.objectives.cadis import CADISConfig
    from rayrcm.sections import DataConfig

WIENER_SOURCES = ("wiener", "wiener_cov")
ADM_PREFIX = "adm:"
REGISTRY_PREFIXES = ("runs:/", "models:/")


class DenoisedClassifier(nn.Module):
    """``logits = classifier(denoiser(y, sigma))`` for noisy ``y`` ``(B, C, H, W)`` around [0, 1].

    Only ``classifier`` is a submodule (see the module docstring); ``denoiser`` is a frozen
    attribute outside the module tree.
    """

    def __init__(self, classifier: nn.Module, denoiser: nn.Module, sigma: float) -> None:
        super().__init__()
        self.classifier = classifier
        self._held = (denoiser.eval().requires_grad_(False),)  # a tuple: nn.Module does not register it
        self.sigma = float(sigma)
        self.num_classes = getattr(classifier, "num_classes", None)

    @property
    def denoiser(self) -> nn.Module:
        return self._held[0]

    @property
    def encoder(self) -> nn.Module | None:  # the optimizer's layer decay finds the classifier's encoder here
        return getattr(self.classifier, "encoder", None)

    def _apply(self, fn: Any, recurse: bool = True) -> DenoisedClassifier:  # .to(), .cuda(), .half(), ...
        super()._apply(fn, recurse)
        self._held[0]._apply(fn)
        return self

    def train(self, mode: bool = True) -> DenoisedClassifier:
        super().train(mode)
        self.denoiser.eval()
        return self

    def denoise(self, y: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
        return self.denoiser(y, self.sigma if sigma is None else float(sigma))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.denoise(y))


# ---- denoiser sources ----


def _get(spec: CADISConfig | Mapping[str, Any], key: str, default: Any = None) -> Any:
    return spec.get(key, default) if isinstance(spec, Mapping) else getattr(spec, key, default)


def check_source(source: str, weights: str = "", schedule: str = "") -> None:
    """A one-line :class:`ConfigError` for a denoiser source that cannot name a denoiser (no file access)."""
    if not source:
        raise ConfigError("method.denoiser", source, f"{' | '.join(WIENER_SOURCES)} | a rayrcm denoiser model.pt | "
                          "adm:module:factory")
    if source.startswith(REGISTRY_PREFIXES):
        raise ConfigError("method.denoiser", source, "a local model.pt of a ddpm run (registry references are not "
                          "resolved for denoisers yet: download it with mlflow artifacts download)")
    if source.startswith(ADM_PREFIX):
        if not weights:
            raise ConfigError("method.denoiser_weights", weights, f"the state dict file of {source}")
        if not schedule:
            raise ConfigError("method.denoiser_schedule", schedule, "a schedule preset (cifar10-cosine-4000 | "
                              "imagenet-linear-1000)")


def training_images(data: DataConfig) -> torch.Tensor:
    """The un-augmented training split of data config ``data`` as floats ``(N, C, H, W)`` in [0, 1]."""
    from rayrcm.data import build_splits
    from rayrcm.data.datasets import eval_images

    splits = build_splits(data)
    images, _ = eval_images(splits.train, list(range(len(cast(Sized, splits.train)))), int(data.image_size), large=splits.large,
                            crop_pct=float(data.crop_pct))
    return images.float() / 255


def _denoiser_file(source: str) -> nn.Module:
    from rayrcm.data.safe_pickle import load_weights_file

    p = Path(source).expanduser()
    if p.is_dir():
        p = p / "model.pt"
    if not p.is_file():
        raise ConfigError("method.denoiser", source, "no such denoiser file (a model.pt of a ddpm run, or its folder)")
    blob = load_weights_file(p, "method.denoiser")
    meta = blob.get("meta") if isinstance(blob, dict) else None
    if not isinstance(meta, dict) or meta.get("export") != "denoiser" or "model" not in blob:
        raise ConfigError("method.denoiser", source, "is not a rayrcm denoiser file (export kind 'denoiser')")
    model = denoiser_from_meta(meta)
    try:
        model.load_state_dict(blob["model"], strict=True)
    except RuntimeError as err:
        raise ConfigError("method.denoiser", source, f"weights do not fit ({str(err).splitlines()[0][:160]})") from None
    return model


def load_denoiser(spec: CADISConfig | Mapping[str, Any], data: DataConfig | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """``(denoiser, info)`` for a method config (or its dict) with ``denoiser``,
    ``denoiser_weights``, ``denoiser_schedule``; ``data`` (a DataConfig) fits the Wiener sources.
    The denoiser is returned in eval mode with every parameter frozen."""
    source = str(_get(spec, "denoiser", "") or "")
    weights, schedule = str(_get(spec, "denoiser_weights", "") or ""), str(_get(spec, "denoiser_schedule", "") or "")
    check_source(source, weights, schedule)
    if source in WIENER_SOURCES:
        if data is None:
            raise ConfigError("method.denoiser", source, "needs the training data to fit (no data config given)")
        images = training_images(data)
        den: nn.Module = WienerDenoiser.fit(images) if source == "wiener" else CovarianceWienerDenoiser.fit(images)
        info: dict[str, Any] = {"kind": source, "fit_images": int(images.shape[0])}
    elif source.startswith(ADM_PREFIX):
        den, info = load_diffusion_denoiser(source[len(ADM_PREFIX):], weights, schedule)
    else:
        den, info = _denoiser_file(source), {"kind": "ddpm", "file": Path(source).name}
    return den.eval().requires_grad_(False), info


def data_config(meta: Mapping[str, Any]) -> DataConfig:
    """The ``data`` section a model file was trained with."""
    from rayrcm.overrides import update_dataclass
    from rayrcm.sections import DataConfig

    return update_dataclass(DataConfig(), dict(meta["config"]["data"]), "data.")


def denoised_classifier_from_meta(meta: Mapping[str, Any], classifier: nn.Module) -> DenoisedClassifier:
    """The network of export kind ``denoised_classifier`` around a freshly built ``classifier``: the
    denoiser comes back from the source its ``method`` config names, at the training sigma."""
    method = meta["config"]["method"]
    denoiser, _ = load_denoiser(method, data_config(meta))
    return DenoisedClassifier(classifier, denoiser, float(method.get("sigma", 0.0)))
