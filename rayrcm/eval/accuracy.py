"""Clean accuracy and accuracy under Gaussian noise of a classifier on [0, 1] images.

``noisy accuracy at sigma`` = fraction of images whose prediction on ``x + sigma * z`` (one draw
per image, ``z ~ N(0, I)``, pixel units) equals the label. It is the base classifier's accuracy
under the smoothing noise, not a certified number.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from rayrcm.data.noise import add_gaussian_noise


@torch.no_grad()
def count_correct(model: nn.Module, dataset: Dataset, sigmas: Sequence[float], *, batch_size: int = 256,
                  device: torch.device | str = "cpu", rank: int = 0, world: int = 1, seed: int = 0) -> torch.Tensor:
    """Counts ``[total, correct@0, correct@sigma_1, ...]`` over this rank's shard (``rank::world``).

    Noise for batch ``b`` comes from a generator seeded by ``(seed, rank, b)``: reproducible.
    """
    shard = Subset(dataset, list(range(rank, len(dataset), world)))  # type: ignore[arg-type]
    counts = torch.zeros(2 + len(sigmas), dtype=torch.long)
    was_training = model.training
    model.eval()
    for b, (views, y) in enumerate(DataLoader(shard, batch_size=batch_size)):
        x = (views[0] if isinstance(views, (list, tuple)) else views).to(device)
        y = y.to(device)
        counts[0] += len(y)
        counts[1] += int((model(x).argmax(1) == y).sum())
        g = torch.Generator(device=x.device).manual_seed(seed * 1_000_003 + rank * 7_919 + b)
        for i, s in enumerate(sigmas):
            counts[2 + i] += int((model(add_gaussian_noise(x, s, generator=g)).argmax(1) == y).sum())
    model.train(was_training)
    return counts


def accuracies(counts: torch.Tensor, sigmas: Sequence[float], prefix: str = "test") -> dict[str, float]:
    total = max(int(counts[0]), 1)
    out = {f"{prefix}_acc_clean": float(counts[1]) / total}
    out.update({f"{prefix}_acc_sigma_{s:g}": float(counts[2 + i]) / total for i, s in enumerate(sigmas)})
    return out
