"""Certified accuracy as a training evaluation: the sequential procedure on the validation split.

``<prefix>_certified_acc_sigma_<s>_r<r>`` is the fraction of images whose smoothed classifier is
*certified* to return the label within L2 radius ``r`` at noise ``s``: each image is drawn until
its radii (``train.eval_radii``) are decided by the anytime-valid confidence sequence of
:mod:`rayrcm.certify.sequential` at ``train.eval_alpha``, or until ``train.eval_max_n`` draws
(undecided: not certified). Each certificate is wrong with probability at most alpha, so the
metric is, up to that, a lower bound on the smoothed classifier's certified accuracy at ``r``:
unlike the ``smoothed`` evaluation's majority vote, it ranks trials (ASHA, checkpoint selection)
by a number with a guarantee, at a cost of a few hundred draws per image on confident models.

Noise: image ``i`` of the split draws the estimation stream of ``(seed, i)`` (per sigma its own
seed), so the counts do not depend on the number of workers or on the shard an image falls in.
``<prefix>_certified_samples_sigma_<s>``: the draws per image it took (mean).
"""

from __future__ import annotations

from collections.abc import Sequence, Sized
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from rayrcm.certify.sequential import CERTIFIED, run_sequences
from rayrcm.certify.smoothing import Smoother
from rayrcm.eval.base import Evaluation

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from rayrcm.sections import Experiment

BLOCK = 100  # draws per look, as the certify job's default


class CertifiedAccuracy(Evaluation):
    """Certified accuracy at ``radii`` for each of ``sigmas`` (see the module docstring)."""

    def __init__(self, sigmas: Sequence[float], radii: Sequence[float], *, max_n: int = 2000, alpha: float = 0.001,
                 batch: int = 2000, images_per_pass: int = 64) -> None:
        self.sigmas, self.radii = tuple(float(s) for s in sigmas), tuple(float(r) for r in radii)
        self.max_n, self.alpha, self.batch, self.images_per_pass = max_n, alpha, batch, images_per_pass

    @classmethod
    def from_config(cls, cfg: Experiment) -> CertifiedAccuracy:
        t = cfg.train
        return cls(t.eval_sigmas, t.eval_radii, max_n=t.eval_max_n, alpha=t.eval_alpha)

    def metric_names(self, prefix: str) -> list[str]:
        return [f"{prefix}_certified_acc_sigma_{s:g}_r{r:g}" for s in self.sigmas for r in self.radii]

    def describe(self) -> str:
        return (f"certified accuracy at r = {', '.join(f'{r:g}' for r in self.radii)} (sequential, at most "
                f"{self.max_n} draws per image, alpha {self.alpha:g})")

    @torch.no_grad()
    def counts(self, model: nn.Module, dataset: Dataset[Any], *, device: torch.device | str = "cpu", rank: int = 0,
               world: int = 1, seed: int = 0) -> torch.Tensor:
        """``[images, certified (sigma, radius)..., draws per sigma...]`` over this rank's shard."""
        k, r = len(self.sigmas), len(self.radii)
        out = torch.zeros(1 + k * r + k, dtype=torch.long)
        index = list(range(rank, len(cast(Sized, dataset)), world))
        out[0] = len(index)
        was_training = model.training
        try:
            for si, sigma in enumerate(self.sigmas):
                sm = Smoother(model, 0, sigma, batch=self.batch, block=BLOCK, device=device)
                for start in range(0, len(index), self.images_per_pass):
                    part = index[start:start + self.images_per_pass]
                    items = [dataset[i] for i in part]
                    x = torch.stack([v[0] if isinstance(v, (list, tuple)) else v for v, _ in items])
                    y = [int(label) for _, label in items]
                    res = run_sequences(sm, x, y, part, radii=self.radii, alpha=self.alpha, n_max=self.max_n,
                                        seed=seed * 1_000_003 + si, chunk=self.max_n)
                    for j in range(r):
                        out[1 + si * r + j] += sum(int(q.decisions[j] == CERTIFIED) for q in res)
                    out[1 + k * r + si] += sum(q.samples for q in res)
        finally:
            model.train(was_training)
        return out

    def metrics(self, counts: torch.Tensor, prefix: str) -> dict[str, float]:
        k, r = len(self.sigmas), len(self.radii)
        total = max(int(counts[0]), 1)
        out = {}
        for si, s in enumerate(self.sigmas):
            for j, rad in enumerate(self.radii):
                out[f"{prefix}_certified_acc_sigma_{s:g}_r{rad:g}"] = float(counts[1 + si * r + j]) / total
            out[f"{prefix}_certified_samples_sigma_{s:g}"] = float(counts[1 + k * r + si]) / total
        return out
