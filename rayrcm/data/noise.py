"""Gaussian noise in [0, 1] pixel space and the Karras et al. (2022) noise-level schedule."""

from __future__ import annotations

from typing import cast

import torch


def add_gaussian_noise(x: torch.Tensor, sigma: float | torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x + sigma * N(0, I)``. ``sigma`` is a float or a ``(B,)`` tensor (one level per sample).

    Noise is added to [0, 1] pixels *before* the model's normalization layer, without clamping,
    exactly as randomized smoothing certifies it.
    """
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if isinstance(sigma, torch.Tensor) and sigma.ndim == 1:
        sigma = sigma.view(-1, *([1] * (x.ndim - 1)))
    return x + sigma * noise


def karras_sigmas(num_levels: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) levels, index 0 = ``sigma_max`` down to index N-1 = ``sigma_min``:

    ``sigma_i = (sigma_max^(1/rho) + i/(N-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``.
    """
    if num_levels < 2:
        raise ValueError(f"num_levels={num_levels} must be >= 2")
    i = torch.arange(num_levels, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return cast(torch.Tensor, ((hi + i / (num_levels - 1) * (lo - hi)) ** rho).float())


def nearest_karras_sigma(sigma: float, num_levels: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> float:
    """The level of :func:`karras_sigmas` nearest ``sigma`` (the first on a tie).

    The RCM authors' ``FinetuneModel.find_nearest`` (``rrcm_tune.py``, also used by ``certify.py``):
    a classifier fine-tuned or certified at noise ``sigma`` conditions the pretrained encoder (its
    time input and its input scaling ``c_in``) on the level of the pretraining grid nearest
    ``sigma``, not on ``sigma`` itself; the grid has the ``N`` levels pretraining ended with.
    """
    grid = karras_sigmas(num_levels, sigma_min, sigma_max, rho)
    return float(grid[(grid - sigma).abs().argmin()])
