"""A small UNet eps-model for the bundled digits: ``forward(x_t, t) -> eps``, the signature of
OpenAI's improved-diffusion / guided-diffusion UNets, so :class:`~rayrcm.models.denoisers.EpsilonDiffusionDenoiser`
wraps it exactly as it wraps theirs.

Layout (Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020, scaled down;
no attention): a 3x3 stem, then per level one residual block (GroupNorm, SiLU, 3x3 conv, plus a
projection of the sinusoidal timestep embedding) and a stride-2 down-sampling conv; a middle block;
the mirror path with skip concatenation and nearest up-sampling; GroupNorm, SiLU and a
zero-initialised 3x3 output conv (so an untrained model predicts eps = 0). At ``base=32,
mults=(1, 2)`` it has about 0.37M parameters and trains on 16x16 digits on a CPU in a minute.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from rayrcm.errors import ConfigError


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f_k), sin(t f_k)]`` with ``f_k = max_period^(-k/half)``
    (improved-diffusion ``nn.timestep_embedding``); ``t`` ``(B,)``, integer or float."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ResBlock(nn.Module):
    """``h = conv(silu(norm(x))) + W emb(t); out = skip(x) + conv(silu(norm(h)))``."""

    def __init__(self, cin: int, cout: int, tdim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.temb(emb)[:, :, None, None]
        return cast(torch.Tensor, self.skip(x) + self.conv2(F.silu(self.norm2(h))))


class SmallUNet(nn.Module):
    """eps-model ``(B, C, H, W), (B,) -> (B, out_channels, H, W)``; ``H, W`` divisible by ``2^(len(mults)-1)``.

    ``out_channels`` defaults to ``in_channels``; ``2 * in_channels`` mimics a learned-variance model.
    """

    def __init__(self, in_channels: int = 3, base: int = 32, mults: tuple[int, ...] = (1, 2),
                 out_channels: int | None = None) -> None:
        super().__init__()
        if base < 1 or not mults or any(m < 1 for m in mults):
            raise ConfigError("unet", (base, tuple(mults)), "base >= 1 and a non-empty tuple of multipliers >= 1")
        self.in_channels, self.base, self.mults = in_channels, base, tuple(mults)
        tdim = 4 * base
        self.time = nn.Sequential(nn.Linear(base, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.stem = nn.Conv2d(in_channels, base, 3, padding=1)
        widths = [base * m for m in self.mults]
        self.down_blocks, self.downs = nn.ModuleList(), nn.ModuleList()
        cin = base
        for i, w in enumerate(widths):
            self.down_blocks.append(ResBlock(cin, w, tdim))
            self.downs.append(nn.Conv2d(w, w, 3, stride=2, padding=1) if i < len(widths) - 1 else nn.Identity())
            cin = w
        self.mid = ResBlock(cin, cin, tdim)
        self.up_blocks, self.ups = nn.ModuleList(), nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            self.up_blocks.append(ResBlock(cin + w, w, tdim))
            self.ups.append(nn.Upsample(scale_factor=2, mode="nearest") if i > 0 else nn.Identity())
            cin = w
        self.out_norm = _norm(cin)
        self.out = nn.Conv2d(cin, out_channels or in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        if self.out.bias is not None:  # always: the Conv2d has a bias
            nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        factor = 2 ** (len(self.mults) - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ConfigError("data.image_size", tuple(x.shape[-2:]), f"divisible by {factor} for this UNet")
        emb = self.time(timestep_embedding(t, self.base))
        h = self.stem(x)
        skips = []
        for block, down in zip(self.down_blocks, self.downs):
            h = block(h, emb)
            skips.append(h)
            h = down(h)
        h = self.mid(h, emb)
        for block, up in zip(self.up_blocks, self.ups):
            h = up(block(torch.cat([h, skips.pop()], dim=1), emb))
        return cast(torch.Tensor, self.out(F.silu(self.out_norm(h))))
