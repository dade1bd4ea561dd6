"""Clean accuracy and accuracy under Gaussian noise of a classifier on [0, 1] images.

``noisy accuracy at sigma`` = fraction of images whose prediction on ``x + sigma * z`` (one draw
per image, ``z ~ N(0, I)``, pixel units) equals the label. It is the base classifier's accuracy
under the smoothing noise, not a certified number.

``smoothed accuracy at sigma`` (with ``votes`` = k > 1) = fraction of images whose majority vote
over k noise draws equals the label: a Monte Carlo estimate of the smoothed classifier
g(x) = argmax_c P[f(x + sigma z) = c] of Cohen et al. (2019), i.e. of certified accuracy at
radius 0 without abstention. It is the sweep metric (it tracks certified accuracy better than
one draw does) at k times the cost of one noisy pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from rayrcm.data.noise import add_gaussian_noise
from rayrcm.eval.base import Evaluation

if TYPE_CHECKING:
    from rayrcm.sections import Experiment


@torch.no_grad()
def count_correct(model: nn.Module, dataset: Dataset[Any], sigmas: Sequence[float], *, batch_size: int = 256,
                  device: torch.device | str = "cpu", rank: int = 0, world: int = 1, seed: int = 0,
                  votes: int = 1) -> torch.Tensor:
    """Counts ``[total, correct@0, correct@sigma_1, ..., (smoothed@sigma_1, ...)]`` over this
    rank's shard (``rank::world``); the smoothed counts only when ``votes > 1``.

    Noise for batch ``b`` comes from a generator seeded by ``(seed, rank, b)``: reproducible.
    """
    shard = Subset(dataset, list(range(rank, len(dataset), world)))  # type: ignore[arg-type]
    k = len(sigmas)
    counts = torch.zeros(2 + k + (k if votes > 1 else 0), dtype=torch.long)
    was_training = model.training
    model.eval()
    for b, (views, y) in enumerate(DataLoader(shard, batch_size=batch_size)):
        x = (views[0] if isinstance(views, (list, tuple)) else views).to(device)
        y = y.to(device)
        counts[0] += len(y)
        counts[1] += int((model(x).argmax(1) == y).sum())
        g = torch.Generator(device=x.device).manual_seed(seed * 1_000_003 + rank * 7_919 + b)
        for i, s in enumerate(sigmas):
            logits = model(add_gaussian_noise(x, s, generator=g))
            counts[2 + i] += int((logits.argmax(1) == y).sum())
            if votes > 1:
                tally = torch.zeros_like(logits, dtype=torch.long).scatter_(1, logits.argmax(1, keepdim=True), 1)
                for _ in range(votes - 1):
                    tally.scatter_add_(1, model(add_gaussian_noise(x, s, generator=g)).argmax(1, keepdim=True),
                                       torch.ones_like(y[:, None]))
                counts[2 + k + i] += int((tally.argmax(1) == y).sum())
    model.train(was_training)
    return counts


def accuracies(counts: torch.Tensor, sigmas: Sequence[float], prefix: str = "test") -> dict[str, float]:
    total = max(int(counts[0]), 1)
    out = {f"{prefix}_acc_clean": float(counts[1]) / total}
    out.update({f"{prefix}_acc_sigma_{s:g}": float(counts[2 + i]) / total for i, s in enumerate(sigmas)})
    if len(counts) == 2 + 2 * len(sigmas):
        k = len(sigmas)
        out.update({f"{prefix}_smoothed_acc_sigma_{s:g}": float(counts[2 + k + i]) / total for i, s in enumerate(sigmas)})
    return out


class NoisyAccuracy(Evaluation):
    """``<prefix>_acc_clean`` and ``<prefix>_acc_sigma_<s>`` (one noise draw per image) at ``train.eval_sigmas``."""

    def __init__(self, sigmas: Sequence[float], batch_size: int = 256) -> None:
        self.sigmas, self.batch_size = tuple(sigmas), batch_size

    @classmethod
    def from_config(cls, cfg: Experiment) -> NoisyAccuracy:
        return cls(cfg.train.eval_sigmas)

    def metric_names(self, prefix: str) -> list[str]:
        return [f"{prefix}_acc_clean"] + [f"{prefix}_acc_sigma_{s:g}" for s in self.sigmas]

    def counts(self, model: nn.Module, dataset: Dataset[Any], *, device: torch.device | str = "cpu", rank: int = 0,
               world: int = 1, seed: int = 0) -> torch.Tensor:
        return count_correct(model, dataset, self.sigmas, batch_size=self.batch_size, device=device, rank=rank, world=world,
                             seed=seed)

    def metrics(self, counts: torch.Tensor, prefix: str) -> dict[str, float]:
        return accuracies(counts, self.sigmas, prefix)


class SmoothedAccuracy(NoisyAccuracy):
    """``<prefix>_smoothed_acc_sigma_<s>``: the majority vote of ``train.eval_votes`` noise draws
    per image (a Monte Carlo estimate of the smoothed classifier's accuracy; the sweep metric)."""

    def __init__(self, sigmas: Sequence[float], votes: int, batch_size: int = 256) -> None:
        super().__init__(sigmas, batch_size)
        self.votes = max(2, votes)

    @classmethod
    def from_config(cls, cfg: Experiment) -> SmoothedAccuracy:
        return cls(cfg.train.eval_sigmas, cfg.train.eval_votes)

    def metric_names(self, prefix: str) -> list[str]:
        return [f"{prefix}_smoothed_acc_sigma_{s:g}" for s in self.sigmas]

    def counts(self, model: nn.Module, dataset: Dataset[Any], *, device: torch.device | str = "cpu", rank: int = 0,
               world: int = 1, seed: int = 0) -> torch.Tensor:
        return count_correct(model, dataset, self.sigmas, batch_size=self.batch_size, device=device, rank=rank, world=world,
                             seed=seed, votes=self.votes)

    def metrics(self, counts: torch.Tensor, prefix: str) -> dict[str, float]:
        return {k: v for k, v in accuracies(counts, self.sigmas, prefix).items() if "_smoothed_" in k}
