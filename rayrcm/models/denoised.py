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
of the ``cadis`` objective, see :func:`load_denoiser`): a registered source of
:mod:`rayrcm.models.denoiser_sources` (the Wiener denoisers fitted on the un-augmented training
split of ``data``, so rebuilding a file refits them; a ``ddpm`` run's ``model.pt``; the user's
installed improved/guided-diffusion model).

``sigma`` is the pixel noise level the denoiser is told (the training sigma in a file; set
``model.sigma`` to certify at another level).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from rayrcm.errors import ConfigError
from rayrcm.models.denoiser_sources import source_of

if TYPE_CHECKING:
    from rayrcm.sections import DataConfig

WIENER_SOURCES = ("wiener", "wiener_cov")  # named in the one-line error of an empty source


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
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # torch leaves Module._apply unannotated
        self._held[0]._apply(fn)
        return self

    def train(self, mode: bool = True) -> DenoisedClassifier:
        super().train(mode)
        self.denoiser.eval()
        return self

    def denoise(self, y: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
        return cast(torch.Tensor, self.denoiser(y, self.sigma if sigma is None else float(sigma)))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.classifier(self.denoise(y)))


# ---- denoiser sources ----


def _get(spec: object, key: str, default: Any = None) -> Any:
    return spec.get(key, default) if isinstance(spec, Mapping) else getattr(spec, key, default)


def check_source(source: str, weights: str = "", schedule: str = "") -> None:
    """A one-line :class:`ConfigError` for a denoiser name that cannot name a denoiser (no file access)."""
    if not source:
        raise ConfigError("method.denoiser", source, f"{' | '.join(WIENER_SOURCES)} | a rayrcm denoiser model.pt | "
                          "adm:module:factory")
    source_of(source)[1].check(source, weights, schedule)


def load_denoiser(spec: object, data: DataConfig | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """``(denoiser, info)`` for a method config (or its dict) with ``denoiser``,
    ``denoiser_weights``, ``denoiser_schedule``; ``data`` (a DataConfig) fits the Wiener sources.
    The denoiser is returned in eval mode with every parameter frozen."""
    source = str(_get(spec, "denoiser", "") or "")
    weights, schedule = str(_get(spec, "denoiser_weights", "") or ""), str(_get(spec, "denoiser_schedule", "") or "")
    check_source(source, weights, schedule)
    den, info = source_of(source)[1].load(source, weights, schedule, data)
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
