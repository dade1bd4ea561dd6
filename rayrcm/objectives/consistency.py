"""Consistency regularization for smoothed classifiers (Jeong & Shin, NeurIPS 2020), as used by
the RCM seed's ``rrcm_tune.py --task=consistency`` (Lei et al., ICLR 2025).

For ``m`` independent noisy copies ``x + d_i`` (``d_i ~ N(0, sigma^2 I)``, pixel units) of each
input, with ``F`` the softmax output of the classifier and ``F_mean = (1/m) sum_i F(x + d_i)``:

    L = (1/m) sum_i CE(F(x + d_i), y)                       # classification on every copy
        + lbd * (1/m) sum_i KL(F_mean || F(x + d_i))        # consistency across the copies
        + eta * H(F_mean)                                   # entropy of the mean prediction

averaged over the batch (Jeong & Shin, Eq. 6-7 and their ``consistency_loss(..., loss='default')``;
``KL`` and ``H`` are per sample, summed over classes, ``H(p) = -sum p log p`` with ``p`` clamped
at 1e-20 as in both codes). With mixup/cutmix, ``y`` is timm's soft target, drawn *before* the
noise, and CE is the soft-target cross-entropy, as in the seed. ``lbd = eta = 0`` is Gaussian
noise augmentation with ``m`` draws per image.

The seed's ``noise_aug`` is the noise std on data scaled to [-1, 1]: ``sigma = noise_aug / 2``.
Its hyper-parameters: ``m = 2``, ``eta = 0.5``, ``lbd = 10`` (sigma 0.25) or 20 (sigma 0.5, 1.0).

In consistency mode the seed leaves the linear head out of the optimizer, so the head keeps its
initial weights and only the encoder learns; ``train_head = False`` keeps that behaviour (the
default), ``True`` trains the head too. Our head starts from PyTorch's default ``nn.Linear`` init, not
the seed's ``trunc_normal(std=2e-5)``: a near-zero frozen head would leave the logits near zero.

Shapes: ``views = [x]`` with ``x`` ``(B, 3, H, W)`` in [0, 1]; ``target`` ``(B,)``.
Example: ``--set method.name=consistency --set method.sigma=0.25 --set method.lbd=10``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import nn
from torch.nn import functional as F

from rayrcm.data.noise import add_gaussian_noise
from rayrcm.data.views import build_mixup
from rayrcm.errors import ConfigError
from rayrcm.models import Classifier, build_classifier
from rayrcm.objectives.base import LossOutput, MethodConfig, Objective
from rayrcm.objectives.gaussian import soft_cross_entropy

if TYPE_CHECKING:
    from rayrcm.sections import Experiment


@dataclass(frozen=True)
class ConsistencyConfig(MethodConfig):
    export: ClassVar[str] = "classifier"
    name: str = "consistency"
    sigma: float = 0.25  # training noise std, pixel units (the seed's noise_aug / 2)
    m: int = 2  # noisy copies per image
    lbd: float = 10.0  # weight of the KL consistency term
    eta: float = 0.5  # weight of the entropy term
    train_head: bool = False  # the seed keeps the linear head out of the optimizer

    def validate(self, cfg: Experiment) -> None:
        if self.sigma < 0:
            raise ConfigError("method.sigma", self.sigma, "must be >= 0 (pixel units, data in [0, 1])")
        if self.m < 1:
            raise ConfigError("method.m", self.m, "must be >= 1 (noisy copies per image)")
        for key in ("lbd", "eta"):
            if getattr(self, key) < 0:
                raise ConfigError(f"method.{key}", getattr(self, key), "must be >= 0")


def kl_to_mean(logits: list[torch.Tensor]) -> torch.Tensor:
    """``(1/m) sum_i KL(F_mean || softmax(logits_i))`` per sample, ``(B,)``."""
    probs = [F.softmax(z.float(), dim=1) for z in logits]
    mean = cast(torch.Tensor, sum(probs)) / len(probs)
    kls = (F.kl_div(F.log_softmax(z.float(), dim=1), mean, reduction="none").sum(1) for z in logits)
    return cast(torch.Tensor, sum(kls)) / len(logits)


def mean_entropy(logits: list[torch.Tensor]) -> torch.Tensor:
    """``H(F_mean)`` per sample, ``(B,)``."""
    mean = cast(torch.Tensor, sum(F.softmax(z.float(), dim=1) for z in logits)) / len(logits)
    return -(mean * torch.log(mean.clamp(min=1e-20))).sum(1)


def consistency_loss(logits: list[torch.Tensor], target: torch.Tensor, lbd: float, eta: float,
                     smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The full loss for ``m`` logit batches ``(B, K)`` of the same images; returns (loss, terms)."""
    ce = cast(torch.Tensor, sum(soft_cross_entropy(z, target, smoothing) for z in logits)) / len(logits)
    kl, ent = kl_to_mean(logits).mean(), mean_entropy(logits).mean()
    return ce + lbd * kl + eta * ent, {"ce": ce.detach(), "kl": kl.detach(), "entropy": ent.detach()}


class ConsistencyObjective(Objective):
    def __init__(self, cfg: ConsistencyConfig, classifier: Classifier, mixup: Any | None, smoothing: float) -> None:
        super().__init__()
        self.cfg, self.classifier, self.mixup, self.smoothing = cfg, classifier, mixup, smoothing
        if not cfg.train_head:
            for p in classifier.head.parameters():
                p.requires_grad_(False)

    def forward(self, views: list[torch.Tensor], target: torch.Tensor, step: int) -> LossOutput:
        x = views[0]
        if self.mixup is not None:
            x, target = self.mixup(x, target)
        m = self.cfg.m
        noisy = add_gaussian_noise(x.repeat(m, 1, 1, 1), self.cfg.sigma)  # m independent draws per image
        logits = list(self.classifier(noisy).chunk(m))
        loss, terms = consistency_loss(logits, target, self.cfg.lbd, self.cfg.eta, 0.0 if self.mixup is not None else self.smoothing)
        if target.ndim == 1:
            terms["train_acc"] = (logits[0].argmax(1) == target).float().mean().detach()
        return LossOutput(loss, terms)

    def export(self) -> nn.Module:
        return self.classifier


def build(cfg: Experiment, num_classes: int) -> ConsistencyObjective:
    clf = build_classifier(cfg.model, cfg.data.image_size, num_classes)
    return ConsistencyObjective(cfg.method, clf, build_mixup(cfg.data, num_classes), cfg.data.label_smoothing)
