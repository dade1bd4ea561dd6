"""DDPM: a diffusion denoiser trained by epsilon prediction (Ho, Jain & Abbeel, "Denoising Diffusion
Probabilistic Models", NeurIPS 2020, ``L_simple``; cosine schedule of Nichol & Dhariwal, "Improved
Denoising Diffusion Probabilistic Models", ICML 2021), so the denoised-smoothing pipeline of DDS /
FT-CADIS runs end to end on the bundled digits with a denoiser rayrcm trains itself.

With ``x~ = 2x - 1`` (data in [-1, 1], improved-diffusion's convention), ``t ~ U{0, ..., T-1}``
(its ``UniformSampler``), ``eps ~ N(0, I)``::

    x_t = sqrt(abar_t) x~ + sqrt(1 - abar_t) eps          (``q_sample``)
    L   = mean_{b, c, h, w} ( eps_theta(x_t, t) - eps )^2   (``mean_flat`` then the batch mean)

The eps-model is a :class:`~rayrcm.models.unet.SmallUNet` fed the integer ``t`` (no rescaling).
It exports an :class:`~rayrcm.models.denoisers.EpsilonDiffusionDenoiser` (export kind
``"denoiser"``, rebuilt by :func:`~rayrcm.models.denoisers.denoiser_from_meta`): the DDS one-shot
denoiser ``forward(y, sigma) -> x_hat`` used in front of a classifier.
Shapes: ``views = [x]``, ``x`` ``(B, C, H, W)`` in [0, 1]; labels are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, cast

import torch
from torch import nn

from rayrcm.errors import ConfigError
from rayrcm.models.denoisers import SCHEDULE_KINDS, DiffusionSchedule, ddpm_denoiser
from rayrcm.objectives.base import LossOutput, MethodConfig, Objective

if TYPE_CHECKING:
    from rayrcm.sections import Experiment


@dataclass(frozen=True)
class DDPMConfig(MethodConfig):
    export: ClassVar[str] = "denoiser"
    name: str = "ddpm"
    schedule: str = "cosine"  # cosine | linear (improved-diffusion's get_named_beta_schedule)
    steps: int = 1000  # T
    base_channels: int = 32  # UNet width at full resolution
    channel_mults: tuple[int, ...] = (1, 2)  # one level per entry; the image size must divide by 2^(levels-1)
    channels: int = 3  # image channels

    def validate(self, cfg: Experiment) -> None:
        if self.schedule not in SCHEDULE_KINDS:
            raise ConfigError("method.schedule", self.schedule, f"one of {', '.join(SCHEDULE_KINDS)}")
        if int(self.steps) != self.steps or self.steps < 2:
            raise ConfigError("method.steps", self.steps, "an integer >= 2 (diffusion steps T)")
        if self.base_channels < 1:
            raise ConfigError("method.base_channels", self.base_channels, "an integer >= 1")
        if not self.channel_mults or any(int(m) != m or m < 1 for m in self.channel_mults):
            raise ConfigError("method.channel_mults", self.channel_mults, "a non-empty tuple of integers >= 1")
        size = getattr(getattr(cfg, "data", None), "image_size", None)
        factor = 2 ** (len(self.channel_mults) - 1)
        if size is not None and int(size) % factor:
            raise ConfigError("data.image_size", size,
                              f"divisible by {factor} for method.channel_mults={self.channel_mults}")

    def diffusion(self) -> DiffusionSchedule:
        return DiffusionSchedule(self.schedule, int(self.steps), rescale_timesteps=False)


def ddpm_loss(eps_model: nn.Module, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``mean (eps_theta(sqrt(abar_t) (2x-1) + sqrt(1-abar_t) eps, t) - eps)^2``, given ``t`` ``(B,)`` and ``noise``."""
    a = alphas_cumprod.to(x.device)[t].view(-1, *([1] * (x.ndim - 1)))
    x_t = (a.sqrt() * (2 * x - 1) + (1 - a).sqrt() * noise).to(x.dtype)
    return cast(torch.Tensor, ((eps_model(x_t, t).float() - noise.float()) ** 2).mean())


class DDPMObjective(Objective):
    def __init__(self, cfg: DDPMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.denoiser = ddpm_denoiser(cfg)  # the exported network; trains through its eps_model

    def forward(self, views: list[torch.Tensor], target: torch.Tensor, step: int) -> LossOutput:
        x = views[0]
        t = torch.randint(0, self.cfg.steps, (x.shape[0],), device=x.device)
        noise = torch.randn_like(x)
        loss = ddpm_loss(self.denoiser.eps_model, x, t, noise, self.denoiser.alphas_cumprod)
        return LossOutput(loss, {"eps_mse": loss.detach()})

    def export(self) -> nn.Module:
        return self.denoiser


def build(cfg: Experiment, num_classes: int) -> DDPMObjective:
    return DDPMObjective(cfg.method)
