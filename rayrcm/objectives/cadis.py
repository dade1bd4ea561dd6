"""CADIS: confidence-aware denoised fine-tuning of an off-the-shelf classifier (Jang, Kim, Kim, Shin
& Shin, "Confidence-aware Denoised Fine-tuning of Off-the-shelf Models for Certified Robustness",
TMLR 2024, "FT-CADIS"; the authors' code: suhyeok-jang/FT-CADIS, ``train.py`` ``ft_cadis`` and ``PGD``).

A classifier ``f`` is fine-tuned behind a **frozen** denoiser ``D`` so that ``f(D(x + sigma z))`` is a
good base classifier for randomized smoothing. In [-1, 1] units (``x~ = 2x - 1``), for each image
``x`` with label ``y`` and ``M`` noisy copies ``x^_i = 2 D(x + sigma z_i, sigma) - 1``
(``z_i ~ N(0, I)``, pixel units; ``train.py:439-444, 478-479``)::

    c_i      = 1[argmax f(x^_i) = y]                       (confidence mask)
    p_bar    = (1/M) sum_i softmax f(x^_i)                 (not detached: the KL trains through it)
    L_SCE    = (1/M) sum_i c_i CE(f(x^_i), y)              (divisor M; warm_start: if no c_i, the
                                                            copy of lowest CE counts; ``515-524``)
    L_MAdv   = max_i KL(p_bar || f(x~ + eta_i))            (only if every c_i = 1; ``527-545``)
    L        = mean_b [ L_SCE + lbd * prod_i c_i * L_MAdv ]

**The attack** (``PGD.attack``, ``train.py:604-702``) searches the denoiser's residual
``eta^0 = x^ - x~`` (per-sample mean ``mu0`` and RMS ``s0`` over all pixels), with the classifier
in eval mode and frozen (``500-507``), ``K`` steps of size ``alpha = 2 eps / K``::

    g   = grad_eta sum_b (1/M) sum_i KL(p_bar || f(x~ + eta_i))
    eta = eta + alpha g / (||g||_2 + 1e-8)
    eta = eta^0 + renorm_{||.||_2 <= eps}(eta - eta^0)      (torch.renorm, as the authors)
    eta = mu0 + (eta - mean(eta)) * s0 / RMS(eta)           (mean preserved; RMS only if mu0 = 0)

no clamp. ``eps`` is in [-1, 1] units (the seed's ``--eps 64`` / 256 = 0.25, i.e. 0.125 in pixels).
The classifier here takes [0, 1] pixels, so ``f(x~ + eta)`` is ``classifier(x + eta / 2)``.

**Seeds** (CIFAR-10, ``train_cifar10.sh``): ``sigma = 1.0``, ``M = 4``, ``lbd = 4``, ``eps = 0.25``,
``K = 4``, ``--warm_start`` (the defaults here); ImageNet: ``M = 2``, ``lbd = 2``, ``K = 1``.
``data.batch_size`` counts unique images (the authors: ``batch * accum * gpus / M``); each step
runs ``M * batch`` images through the classifier, plus ``K`` attack passes.

**Networks.** The classifier is ``model.*`` (``model.init_from``: the user's local weights; a whole
classifier file loads with its head, an encoder file gets a fresh head; nothing is downloaded).
The denoiser comes from ``method.denoiser`` (:func:`rayrcm.models.denoised.load_denoiser`: a
rayrcm ``ddpm`` model file, ``adm:module:factory`` with ``denoiser_weights`` and
``denoiser_schedule``, or ``wiener`` / ``wiener_cov`` fitted on the training split for fast runs);
it is outside DDP and outside every ``state_dict``. The export is a
:class:`~rayrcm.models.denoised.DenoisedClassifier` (kind ``denoised_classifier``): ``f(D(y, sigma))``,
whose file holds the classifier only and rebuilds the denoiser from the recorded source.

Shapes: ``views = [x]`` with ``x`` ``(B, C, H, W)`` in [0, 1]; ``target`` ``(B,)`` integer labels.
Example: ``--set method.name=cadis --set method.sigma=0.5 --set method.denoiser=wiener``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, cast

import torch
from torch import nn
from torch.nn import functional as F

from rayrcm.errors import ConfigError
from rayrcm.models import build_classifier
from rayrcm.models.denoised import DenoisedClassifier, check_source, load_denoiser
from rayrcm.objectives.base import LossOutput, MethodConfig, Objective

if TYPE_CHECKING:
    from rayrcm.sections import Experiment


@dataclass(frozen=True)
class CADISConfig(MethodConfig):
    export: ClassVar[str] = "denoised_classifier"
    name: str = "cadis"
    sigma: float = 1.0  # smoothing noise std, pixel units (both seeds: 1.0)
    m: int = 4  # noisy copies per image (--num_noises; ImageNet 2)
    lbd: float = 4.0  # weight of L_MAdv (--lbd; ImageNet 2.0)
    eps: float = 0.25  # L2 radius of the residual attack, [-1, 1] units (--eps 64 / 256)
    steps: int = 4  # attack steps K (--num-steps; ImageNet 1)
    warm_start: bool = True  # no correct copy: the lowest-CE copy counts in L_SCE (--warm_start)
    denoiser: str = "wiener"  # wiener | wiener_cov | path to a ddpm model.pt | adm:module:factory
    denoiser_weights: str = ""  # adm: the state dict file
    denoiser_schedule: str = ""  # adm: cifar10-cosine-4000 | imagenet-linear-1000

    def validate(self, cfg: Experiment) -> None:
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ConfigError("method.sigma", self.sigma, "> 0 (pixel units, data in [0, 1])")
        if int(self.m) != self.m or self.m < 1:
            raise ConfigError("method.m", self.m, "an integer >= 1 (noisy copies per image)")
        if int(self.steps) != self.steps or self.steps < 0:
            raise ConfigError("method.steps", self.steps, "an integer >= 0 (attack steps)")
        for key in ("lbd", "eps"):
            v = getattr(self, key)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"method.{key}", v, ">= 0")
        check_source(self.denoiser, self.denoiser_weights, self.denoiser_schedule)


# ---- the loss, on logits (hand-checkable) ----


def kl_from(p: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(p || softmax(logits))`` per sample ``(B,)``, as ``F.kl_div(log_softmax, p).sum(1)`` (grad into ``p`` too)."""
    return F.kl_div(F.log_softmax(logits.float(), dim=1), p, reduction="none").sum(1)


def mean_softmax(clean_logits: list[torch.Tensor]) -> torch.Tensor:
    """``p_bar = (1/M) sum_i softmax(logits_i)``, ``(B, K)``."""
    return cast(torch.Tensor, sum(F.softmax(z.float(), dim=1) for z in clean_logits)) / len(clean_logits)


def cadis_loss(clean_logits: list[torch.Tensor], adv_logits: list[torch.Tensor], target: torch.Tensor, lbd: float,
               warm_start: bool = True, p_bar: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``mean_b [L_SCE + lbd * m * L_MAdv]`` from the ``M`` copies' logits ``(B, K)`` on the denoised
    images and on their attacked versions; returns ``(loss, terms)``."""
    m = len(clean_logits)
    ce = torch.stack([F.cross_entropy(z.float(), target, reduction="none") for z in clean_logits], 1)  # (B, M)
    correct = torch.stack([z.argmax(1) == target for z in clean_logits], 1)  # (B, M)
    keep = correct.clone()
    if warm_start:
        none = ~keep.any(1)
        keep[none, ce[none].argmin(1)] = True  # the authors sort by CE and mark the first (same copy)
    sce = (ce * keep).sum(1) / m
    p_bar = mean_softmax(clean_logits) if p_bar is None else p_bar
    madv = torch.stack([kl_from(p_bar, z) for z in adv_logits], 1).max(1).values
    mask = correct.all(1)
    weighted = lbd * mask * madv
    loss = (sce + weighted).mean()
    return loss, {"sce": sce.mean().detach(), "madv": weighted.mean().detach(), "all_correct": mask.float().mean()}


# ---- the attack on the denoiser's residual ----


def _per_sample(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and RMS over all pixels, shaped to broadcast against ``t``."""
    flat, view = t.reshape(t.shape[0], -1), (-1,) + (1,) * (t.ndim - 1)
    return flat.mean(1).view(view), (flat ** 2).mean(1).sqrt().view(view)


def project_l2(eta: torch.Tensor, eta0: torch.Tensor, eps: float) -> torch.Tensor:
    """``eta0 + renorm_{||.||_2 <= eps}(eta - eta0)`` per sample (the authors' ``diff.renorm(p=2, dim=0, maxnorm=eps)``)."""
    return eta0 + (eta - eta0).renorm(p=2, dim=0, maxnorm=eps)


def recentre(eta: torch.Tensor, mu0: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    """``mu0 + (eta - mean(eta)) / RMS(eta) * s0`` per sample (the authors divide by the RMS, not the std)."""
    mu, s = _per_sample(eta)
    return mu0 + (eta - mu) / s * s0


def attack_residual(f: nn.Module, clean: torch.Tensor, eta0: torch.Tensor, p_bar: torch.Tensor, m: int, eps: float,
                    steps: int) -> torch.Tensor:
    """The FT-CADIS ``PGD.attack``: ``K`` normalized-gradient steps on ``eta`` (``(M B, C, H, W)``,
    [-1, 1] units, copy-major as ``x.repeat(M)``) maximizing ``sum_b (1/M) sum_i KL(p_bar || f(clean + eta_i))``,
    L2-projected to ``eps`` around ``eta0`` and re-centred/rescaled to ``eta0``'s per-sample mean and
    RMS. ``f`` takes [-1, 1] images; it is called as is (the caller freezes it and sets eval mode)."""
    eta0 = eta0.detach()
    n, view = eta0.shape[0], (-1,) + (1,) * (eta0.ndim - 1)
    mu0, s0 = _per_sample(eta0)
    target = p_bar.detach()
    alpha = eps / steps * 2 if steps else 0.0
    eta = eta0
    for _ in range(steps):
        eta = eta.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = f(clean + eta)
            loss = cast(torch.Tensor, sum(kl_from(target, z) for z in logits.chunk(m))) / m
            grad = torch.autograd.grad(loss.sum(), [eta])[0]
        gnorm = grad.reshape(n, -1).norm(dim=1).view(view)
        eta = project_l2(eta.detach() + alpha * grad / (gnorm + 1e-8), eta0, eps)
        eta = recentre(eta, mu0, s0).detach()
    return eta


class _PlusMinusOne(nn.Module):
    """``f(x~) = classifier((x~ + 1) / 2)``: the [0, 1] classifier on [-1, 1] images."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.classifier((z + 1) / 2))


class CADISObjective(Objective):
    def __init__(self, cfg: CADISConfig, classifier: nn.Module, denoiser: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = DenoisedClassifier(classifier, denoiser, cfg.sigma)  # the classifier; the denoiser outside the tree

    @property
    def classifier(self) -> nn.Module:
        return self.model.classifier

    @property
    def denoiser(self) -> nn.Module:
        return self.model.denoiser

    def attack(self, clean: torch.Tensor, eta0: torch.Tensor, p_bar: torch.Tensor) -> torch.Tensor:
        """The residual attack with the classifier frozen and in eval mode; both restored after."""
        c = self.cfg
        was_training = self.classifier.training
        flags = [p.requires_grad for p in self.classifier.parameters()]
        self.classifier.eval().requires_grad_(False)
        try:
            return attack_residual(_PlusMinusOne(self.classifier), clean, eta0, p_bar, c.m, c.eps, c.steps)
        finally:
            for p, flag in zip(self.classifier.parameters(), flags):
                p.requires_grad_(flag)
            self.classifier.train(was_training)

    def forward(self, views: list[torch.Tensor], target: torch.Tensor, step: int) -> LossOutput:
        c = self.cfg
        x = views[0].repeat(c.m, 1, 1, 1)  # copy-major: (M B, C, H, W), as the authors' inputs.repeat
        with torch.no_grad():
            x_hat = self.denoiser(x + c.sigma * torch.randn_like(x), c.sigma).to(x.dtype)
        clean_logits = self.classifier(x_hat).float().chunk(c.m)
        p_bar = mean_softmax(list(clean_logits))
        clean_pm, eta0 = 2 * x - 1, 2 * (x_hat - x)  # x~ and x^ - x~ in [-1, 1] units
        eta = self.attack(clean_pm, eta0, p_bar)  # also at lbd = 0, as the authors (BatchNorm sees the same inputs)
        adv_logits = self.classifier(x + eta / 2).float().chunk(c.m)  # f(x~ + eta) on [0, 1] inputs
        loss, terms = cadis_loss(list(clean_logits), list(adv_logits), target, c.lbd, c.warm_start, p_bar)
        terms["train_acc"] = torch.cat([z.argmax(1) == target for z in clean_logits]).float().mean()
        return LossOutput(loss, terms)

    def export(self) -> nn.Module:
        return self.model


def load_whole_classifier(classifier: nn.Module, path: str) -> None:
    """``model.init_from`` naming a whole classifier (head included, same classes): load all of it
    (``strict=True``); an encoder-only file leaves the fresh head (``build_classifier`` loaded the encoder)."""
    from rayrcm.data.safe_pickle import load_weights_file

    blob = load_weights_file(path, "model.init_from")
    state = blob.get("model", blob) if isinstance(blob, dict) else {}
    if isinstance(state, dict) and state and all(isinstance(k, str) for k in state):
        if any(k.startswith("classifier.") for k in state):  # a denoised_classifier file
            state = {k[len("classifier."):]: v for k, v in state.items() if k.startswith("classifier.")}
        if not any(k.startswith("head.") for k in state):
            return
        try:
            classifier.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ConfigError("model.init_from", path, f"holds a classifier that does not fit model.* and the dataset's "
                              f"classes ({str(err).splitlines()[0][:160]})") from None


def build(cfg: Experiment, num_classes: int) -> CADISObjective:
    clf = build_classifier(cfg.model, cfg.data.image_size, num_classes)
    if cfg.model.init_from:
        load_whole_classifier(clf, cfg.model.init_from)
    denoiser, _ = load_denoiser(cfg.method, cfg.data)
    return CADISObjective(cfg.method, clf, denoiser)
