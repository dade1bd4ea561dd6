"""Gaussian noise augmentation training (Cohen, Rosenfeld & Kolter, ICML 2019).

The base classifier ``F`` of a smoothed classifier is trained on noisy inputs only:

    L = CE( F(x + sigma * z), y ),   z ~ N(0, I),

with ``sigma`` in [0, 1] pixel units (the same space certification adds noise in). With mixup or
cutmix on, ``y`` is timm's soft target and CE is the soft-target cross-entropy; label smoothing
comes with it. ``sigma = 0`` gives plain supervised training.

Shapes: ``views = [x]`` with ``x`` ``(B, 3, H, W)`` in [0, 1]; ``target`` ``(B,)`` integer labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from rayrcm.data.noise import add_gaussian_noise
from rayrcm.data.views import build_mixup
from rayrcm.errors import ConfigError
from rayrcm.models import Classifier, build_classifier
from rayrcm.objectives.base import LossOutput, MethodConfig, Objective

if TYPE_CHECKING:
    from rayrcm.sections import Experiment


@dataclass(frozen=True)
class GaussianConfig(MethodConfig):
    export: ClassVar[str] = "classifier"
    name: str = "gaussian"
    sigma: float = 0.25  # training noise std, pixel units

    def validate(self, cfg: Experiment) -> None:
        if self.sigma < 0:
            raise ConfigError("method.sigma", self.sigma, "must be >= 0 (pixel units, data in [0, 1])")


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """CE for integer targets ``(B,)`` (with label smoothing) or soft targets ``(B, K)``."""
    if target.ndim == 2:
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.float(), target, label_smoothing=smoothing)


class GaussianAugObjective(Objective):
    def __init__(self, cfg: GaussianConfig, classifier: Classifier, mixup: Any | None, smoothing: float) -> None:
        super().__init__()
        self.cfg, self.classifier, self.mixup, self.smoothing = cfg, classifier, mixup, smoothing

    def forward(self, views: list[torch.Tensor], target: torch.Tensor, step: int) -> LossOutput:
        x = views[0]
        if self.mixup is not None:
            x, target = self.mixup(x, target)
        logits = self.classifier(add_gaussian_noise(x, self.cfg.sigma))
        loss = soft_cross_entropy(logits, target, 0.0 if self.mixup is not None else self.smoothing)
        metrics = {}
        if target.ndim == 1:
            metrics["train_acc"] = (logits.argmax(1) == target).float().mean().detach()
        return LossOutput(loss, metrics)

    def export(self) -> nn.Module:
        return self.classifier


def build(cfg: Experiment, num_classes: int) -> GaussianAugObjective:
    clf = build_classifier(cfg.model, cfg.data.image_size, num_classes)
    return GaussianAugObjective(cfg.method, clf, build_mixup(cfg.data, num_classes), cfg.data.label_smoothing)
