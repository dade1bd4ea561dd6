"""RCM: Robust Representation Consistency Model via contrastive denoising.

Lei, Berner, Wang, Chen, Ba, Ren, Zhu, Anandkumar, ICLR 2025, arXiv:2501.13094 (seed 000); the
authors' code is jiachenlei/rRCM (``rrcm/rrcm_denoiser.py``, ``rRCMloss``; ``train.py``).

The encoder ``f`` (with projector ``g``) learns to map a noisy image to the representation of the
clean one in a single forward pass. Per batch, with one noise draw ``z ~ N(0, I)`` shared by all
terms and one noise-level index ``n`` drawn uniformly from ``{0, ..., N-2}`` of the Karras schedule
``sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min``:

    L = InfoNCE_t( g(f(a1 + sigma_min z)),  sg[ g_ema(f_ema(a2 + sigma_min z)) ] )     contrastive,
      + InfoNCE_t( g(f(a2 + sigma_min z)),  sg[ g_ema(f_ema(a1 + sigma_min z)) ] )     symmetric
      + InfoNCE_t( f(x + sigma_n z),        sg[ f(x + sigma_{n+1} z) ] )               consistency

* ``a1``, ``a2``: MoCo v3's two asymmetric views (``data.augmentation=mocov3``: the views
  ``mocov3_1`` / ``mocov3_2``); ``x``: the authors' ``x_start``, a centre crop and flip (view
  ``center``). Other augmentations give ``(weak_view, augmentation, augmentation)``.
* ``f_ema``/``g_ema``: EMA teacher of the online networks. As in the authors' ``utils.ema``, the
  EMA moves parameters only; the teacher's BatchNorm keeps its own running statistics (it runs in
  training mode, on batch statistics, like the online projector).
* The consistency target is the *online* network at the adjacent, smaller noise level under
  stop-gradient (``sg``); the contrastive target is the EMA teacher. Both terms compare CLS
  features of the encoder (consistency) or the ``proj_dim`` projector output (contrastive).
* Projector ``g``: the authors' ``_build_mlp(3, D, hidden, 256)``, :class:`MoCoV3Projector`.
* InfoNCE (:mod:`rayrcm.objectives.contrastive`), temperature ``t = 0.2``, negatives gathered over
  all workers.
* The index ``n`` is the same on every worker (the authors draw it on rank 0 and broadcast it): it
  comes from a generator seeded with ``(train.seed, step)``, so no communication is needed and a
  resumed run draws the same levels. The noise ``z`` is drawn per worker from the global RNG.
* Number of levels ``N`` follows the improved-consistency-training doubling schedule:
  ``N(k) = min(s0 * 2^ceil(k / K'), s1) + 1`` with ``K' = ceil(K / log2(ceil(s1/s0) + 1))``,
  ``s0 = 20``, ``s1 = 80`` (21 -> 41 -> 81 levels over ``K`` steps).
* EMA rate ramps from 0.99 to 0.9999 along the authors' sigmoid schedule:
  ``e = sqrt(k/K_e * (e1^2 - e0^2) + e0^2)``, ``c = 2 / (1 + exp(-A (e - e0)/(e1 - e0))) - 1``,
  ``rate = c * e1 + (1 - c) * e0``.
* Input preconditioning (``precondition=True``): the normalized input is scaled by
  ``c_in = 1 / sqrt(s^2 + sigma_data^2)``, with ``s`` the noise std in normalized ([-1, 1]) units.
  The authors also feed the encoder a time token of ``sigma``; rayrcm's encoders take none.

Units. The authors add noise to data scaled to [-1, 1]; rayrcm adds it to [0, 1] pixels, before
the model's normalization layer ``(x - 0.5) / 0.5``. Every sigma here is in pixel units, so the
seed's ``sigma_min = 0.002``, ``sigma_max = 80`` become 0.001 and 40. ``sigma_data = 0.5`` is in
normalized units, as in the seed.

Shapes: ``views = [x, a1, a2]``, each ``(B, 3, H, W)`` in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from rayrcm.data.noise import karras_sigmas, nearest_karras_sigma
from rayrcm.errors import ConfigError
from rayrcm.models import (
    Encoder,
    MoCoV3Projector,
    Normalize,
    build_encoder,
    ema_update,
    make_frozen_copy,
)
from rayrcm.objectives.base import LossOutput, MethodConfig, Objective
from rayrcm.objectives.contrastive import info_nce

if TYPE_CHECKING:
    from rayrcm.sections import Experiment


@dataclass(frozen=True)
class RCMConfig(MethodConfig):
    name: str = "rcm"
    temperature: float = 0.2
    sigma_min: float = 0.001  # pixel units (seed: 0.002 on [-1, 1] data)
    sigma_max: float = 40.0  # pixel units (seed: 80 on [-1, 1] data)
    rho: float = 7.0
    sigma_data: float = 0.5  # normalized units, as in the seed
    levels_start: int = 20
    levels_end: int = 80
    ema_start: float = 0.99
    ema_end: float = 0.9999
    ema_sharpness: float = 15.0  # the authors' target_ema_A (15 CIFAR-10, 10 ImageNet)
    ema_steps: int = 0  # steps of the EMA ramp; 0 = train.steps
    precondition: bool = True
    gather: bool = True  # negatives from all workers
    weak_view: str = ""  # the consistency input x; "": "center" with augmentation "mocov3", else "weak"

    def views(self, augmentation: str) -> tuple[str, ...]:
        """``(x, a1, a2)``: with ``mocov3`` the authors' ``(x_start, MoCo v3 view 1, view 2)``."""
        if augmentation == "mocov3":
            return (self.weak_view or "center", "mocov3_1", "mocov3_2")
        return (self.weak_view or "weak", augmentation, augmentation)

    def validate(self, cfg: Experiment) -> None:
        if self.temperature <= 0:
            raise ConfigError("method.temperature", self.temperature, "must be > 0")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError("method.sigma_min", self.sigma_min, f"must be in (0, method.sigma_max={self.sigma_max})")
        if self.rho <= 0 or self.sigma_data <= 0:
            raise ConfigError("method.rho", self.rho, "rho and sigma_data must be > 0")
        if not 2 <= self.levels_start <= self.levels_end:
            raise ConfigError("method.levels_start", self.levels_start, f"must be in [2, method.levels_end={self.levels_end}]")
        if not 0 < self.ema_start <= self.ema_end < 1:
            raise ConfigError("method.ema_start", self.ema_start, "need 0 < ema_start <= ema_end < 1")
        if self.ema_steps < 0:
            raise ConfigError("method.ema_steps", self.ema_steps, "must be >= 0 (0 = train.steps)")


def num_levels(step: int, total_steps: int, start: int = 20, end: int = 80) -> int:
    """Improved consistency training's doubling schedule of the number of noise levels."""
    k_prime = math.ceil(total_steps / math.log2(math.ceil(end / start) + 1))
    return int(min(start * 2 ** math.ceil(step / k_prime), end)) + 1


def ema_rate(step: int, ramp_steps: int, start: float = 0.99, end: float = 0.9999, sharpness: float = 15.0) -> float:
    """The authors' sigmoid EMA ramp from ``start`` (step 0) to ``end`` (step >= ``ramp_steps``)."""
    e = math.sqrt(step / ramp_steps * (end**2 - start**2) + start**2) if step < ramp_steps else end
    if end == start:
        return start
    c = 2 / (1 + math.exp(-sharpness * (e - start) / (end - start))) - 1
    return c * end + (1 - c) * start


def level_index(seed: int, step: int, levels: int) -> int:
    """The noise-level index ``n`` of ``step``, uniform on ``{0, ..., levels - 2}``: a pure function
    of ``(seed, step)``, so every worker draws the same one (the authors broadcast rank 0's)."""
    g = torch.Generator().manual_seed((seed * 998_244_353 + step * 1_000_003 + 0x5EED) % (2**63 - 1))
    return int(torch.randint(0, levels - 1, (), generator=g))


class RCMObjective(Objective):
    """Online encoder + projector, an EMA teacher of both, and the InfoNCE terms."""

    def __init__(self, cfg: RCMConfig, encoder: Encoder, proj_hidden: int, proj_dim: int, total_steps: int,
                 seed: int = 0) -> None:
        super().__init__()
        self.cfg, self.total_steps, self.seed = cfg, total_steps, seed
        self.normalize = Normalize()
        self.encoder = encoder
        self.projector = MoCoV3Projector(encoder.num_features, proj_hidden, proj_dim, layers=3, last_bn=False)
        self.teacher_encoder = cast(Encoder, make_frozen_copy(encoder))
        self.teacher_projector = make_frozen_copy(self.projector)

    def _scale(self, sigma: torch.Tensor | float) -> torch.Tensor | float:
        if not self.cfg.precondition:
            return 1.0
        s = torch.as_tensor(sigma, dtype=torch.float32) / self.normalize.std_value
        c = 1.0 / torch.sqrt(s**2 + self.cfg.sigma_data**2)
        return c.view(-1, 1, 1, 1) if c.ndim else float(c)

    def _features(self, encoder: Encoder, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        return encoder.forward_features(self.normalize(x) * self._scale(sigma))

    def _contrast(self, q_view: torch.Tensor, k_view: torch.Tensor) -> torch.Tensor:
        """InfoNCE of the online projection of ``q_view`` against the teacher's of ``k_view``."""
        cfg = self.cfg
        h = self.projector(self._features(self.encoder, q_view, cfg.sigma_min))
        with torch.no_grad():
            h_t = self.teacher_projector(self._features(self.teacher_encoder, k_view, cfg.sigma_min))
        return info_nce(h, h_t, cfg.temperature, gather=cfg.gather)

    def forward(self, views: list[torch.Tensor], target: torch.Tensor, step: int) -> LossOutput:
        x, a1, a2 = views
        cfg = self.cfg
        noise = torch.randn_like(x)
        # contrastive term, both directions: nearly clean views, EMA teacher target
        a1n, a2n = a1 + cfg.sigma_min * noise, a2 + cfg.sigma_min * noise
        contrast = self._contrast(a1n, a2n) + self._contrast(a2n, a1n)
        # consistency term: adjacent Karras levels, same noise, online target under stop-gradient
        levels = num_levels(step, self.total_steps, cfg.levels_start, cfg.levels_end)
        sigmas = karras_sigmas(levels, cfg.sigma_min, cfg.sigma_max, cfg.rho)
        n = level_index(self.seed, step, levels)
        s_hi, s_lo = float(sigmas[n]), float(sigmas[n + 1])
        f_hi = self._features(self.encoder, x + s_hi * noise, s_hi)
        with torch.no_grad():
            f_lo = self._features(self.encoder, x + s_lo * noise, s_lo)
        consist = info_nce(f_hi, f_lo, cfg.temperature, gather=cfg.gather)
        metrics = {"contrastive": contrast.detach(), "consistency": consist.detach(),
                   "sigma_level": torch.tensor(s_hi), "num_levels": torch.tensor(float(levels))}
        return LossOutput(contrast + consist, metrics)

    def on_step_end(self, step: int) -> None:
        cfg = self.cfg
        rate = ema_rate(step, cfg.ema_steps or self.total_steps, cfg.ema_start, cfg.ema_end, cfg.ema_sharpness)
        ema_update(self.teacher_encoder, self.encoder, rate, copy_buffers=False)  # buffers: the teacher's own
        ema_update(self.teacher_projector, self.projector, rate, copy_buffers=False)

    def export(self) -> nn.Module:
        return self.encoder


def build(cfg: Experiment, num_classes: int) -> RCMObjective:
    encoder = build_encoder(cfg.model, cfg.data.image_size)
    return RCMObjective(cfg.method, encoder, cfg.model.proj_hidden_dim, cfg.model.proj_dim, cfg.train.steps,
                        seed=cfg.train.seed)


def rcm_input_scale(sigma: float, *, levels: int = 81, sigma_min: float = 0.001, sigma_max: float = 40.0, rho: float = 7.0,
                    sigma_data: float = 0.5, std: float = 0.5) -> float:
    """``c_in`` for a classifier fine-tuned from an RCM encoder at fixed pixel noise ``sigma``.

    The encoder was pretrained on inputs scaled by ``1 / sqrt(s^2 + sigma_data^2)`` with ``s`` the
    noise std in normalized units (``sigma / std``). As the authors' fine-tuning and certification
    (``find_nearest``), ``s`` is the level of the pretraining grid nearest ``sigma``:
    :func:`~rayrcm.data.noise.nearest_karras_sigma` over the ``levels`` Karras levels from
    ``sigma_min`` to ``sigma_max`` (pixel units; ``levels`` = the ``N`` pretraining ended with, 81
    for the seed's runs). A classifier that sees noise ``sigma`` uses this factor as its fixed
    ``model.input_scale``.
    """
    s = nearest_karras_sigma(sigma, levels, sigma_min, sigma_max, rho)
    return 1.0 / math.sqrt((s / std) ** 2 + sigma_data**2)
