"""Input-specific sampling (ISS): each image's estimation sample size chosen from its own pilot.

Chen, Li, Yan, Li & Sheng, "Input-Specific Robustness Certification for Randomized Smoothing"
(AAAI 2022; code: roy-ch/Input-Specific-Certification, ``certify_iss.py``). The fixed protocol of
Cohen et al. spends ``n`` (e.g. 100,000) estimation draws on every image. ISS spends on each image
only what its certified radius needs, within a budget ``max_decline`` on the radius lost against
the full ``n``:

* The *nominal radius* of ``m`` draws at top-class probability ``p`` is
  ``R(m, p) = sigma * Phi^-1(LCB(m p, m))``, the radius CERTIFY returns when ``n_A = m p``
  (``LCB``: the one-sided ``(1 - alpha)`` Clopper-Pearson lower bound, 0 below 1/2).
* For each ``p`` on a grid over [1/2, 1] (step 0.001, as the authors), ``m(p)`` is the smallest
  multiple of ``step`` with ``R(m, p) >= R(n, p) - max_decline`` (``absolute``) or
  ``>= (1 - max_decline) R(n, p)`` (``relative``); ``m(p) = 0`` when that target is <= 0 (the
  full budget would certify at most ``max_decline``: the image abstains without estimation).
* A pilot of ``n0`` draws (the selection draws, which also choose ``c_A``) gives the two-sided
  ``(1 - alpha)`` Clopper-Pearson interval ``[p_lo, p_hi]`` of ``p_A``; the image gets
  ``max m(p)`` over the grid points of that interval and its two neighbours. With probability
  ``>= 1 - alpha`` the interval holds ``p_A``, and then the nominal radius declines by at most the
  budget: the decline guarantee is the paper's.

Soundness (the certificate, not the decline). The estimation sample size ``m`` is a function of
the selection draws alone. The estimation draws are generated independently of them (their own
generator seeds, :func:`~rayrcm.certify.smoothing.noise_seed` with another role), so conditionally
on the selection draws, ``c_A`` and ``m`` are constants and ``n_A`` is Binomial(``m``, ``p_cA``):
the Clopper-Pearson bound holds with probability ``>= 1 - alpha`` conditionally, hence
unconditionally (Cohen et al.'s Prop. 2 argument with a data-independent sample size). What would
void it is choosing ``m`` by looking at the estimation counts (stopping once they look good), or
reusing the pilot draws inside the estimate, as the authors' script does
(``counts_certification = counts_prediction + ...``): here the pilot is never counted in ``n_A``
(``docs/fidelity.md``). An image with ``m = 0`` abstains, which is always sound.

The estimation draws of an ISS image are the first ``m`` draws of the fixed protocol's estimation
stream for the same ``(seed, image)`` (same rows, same blocks), so the two protocols are compared
on the same noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from rayrcm.certify.config import DECLINES
from rayrcm.certify.rows import ESTIMATION, SELECTION, plan_rows
from rayrcm.certify.stats import Certificate, certify_from_counts

if TYPE_CHECKING:
    import torch

    from rayrcm.certify.smoothing import Smoother

GRID_STEP = 0.001  # the authors' grid of p_A values
ISS_ROW = 3  # the role of an ISS row of work: one image's pilot, then its planned estimation draws


def nominal_radius(m: np.ndarray | int, p: np.ndarray | float, alpha: float, sigma: float) -> np.ndarray:
    """``R(m, p) = sigma * Phi^-1(LCB(m p, m))`` (0 where the bound is <= 1/2 or ``m = 0``), broadcast."""
    from scipy.special import betaincinv, ndtri

    m = np.asarray(m, dtype=np.float64)
    k = m * np.asarray(p, dtype=np.float64)
    with np.errstate(all="ignore"):  # m = 0 or k = 0: the bound is 0
        lcb = np.where((m > 0) & (k > 0), betaincinv(np.maximum(k, 1e-300), m - k + 1, alpha), 0.0)
    return np.where(lcb > 0.5, sigma * ndtri(np.clip(lcb, 0.5, 1.0)), 0.0)


@dataclass(frozen=True)
class SampleSizePlan:
    """The table ``m(p)`` for one protocol (``n`` = the fixed protocol's estimation draws)."""

    n: int
    sigma: float
    alpha: float
    max_decline: float
    decline: str = "absolute"
    step: int = 100  # sample sizes are multiples of this (the noise block)
    grid: np.ndarray = field(init=False, repr=False, compare=False)
    sizes: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.decline not in DECLINES:
            raise ValueError(f"decline must be one of {DECLINES}, got {self.decline!r}")
        grid = np.round(np.arange(0, 501) * GRID_STEP + 0.5, 3)
        cand = np.unique(np.append(np.arange(self.step, self.n + 1, self.step), self.n))
        radii = nominal_radius(cand[None, :], grid[:, None], self.alpha, self.sigma)  # (grid, candidates)
        full = nominal_radius(self.n, grid, self.alpha, self.sigma)
        target = full - self.max_decline if self.decline == "absolute" else (1 - self.max_decline) * full
        first = np.argmax(radii >= target[:, None] - 1e-12, axis=1)  # the full n always qualifies
        sizes = np.where(target > 0, cand[first], 0).astype(np.int64)
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "sizes", sizes)

    def size_for_interval(self, p_lo: float, p_hi: float) -> int:
        """``max m(p)`` over the grid points in ``[p_lo, p_hi]`` and the grid point on each side."""
        if p_hi < self.grid[0]:
            return 0  # p_A < 1/2 with confidence: no radius at any n
        lo = max(int(np.searchsorted(self.grid, p_lo, side="left")) - 1, 0)
        hi = min(int(np.searchsorted(self.grid, p_hi, side="left")), len(self.grid) - 1)
        return int(self.sizes[lo:hi + 1].max())

    def size_for(self, selection: np.ndarray) -> int:
        """The estimation sample size of an image from its selection (pilot) counts alone."""
        from statsmodels.stats.proportion import proportion_confint

        selection = np.asarray(selection)
        n0 = int(selection.sum())
        c_a = int(np.argmax(selection))
        lo, hi = proportion_confint(int(selection[c_a]), n0, alpha=self.alpha, method="beta")
        return self.size_for_interval(float(np.nan_to_num(lo, nan=0.0)), float(np.nan_to_num(hi, nan=1.0)))


def estimation_counts(sm: Smoother, x: torch.Tensor, *, index: int, seed: int, m: int, chunk: int) -> np.ndarray:
    """Per-class counts of the first ``m`` estimation draws of image ``index`` (the fixed protocol's rows)."""
    import torch

    out = torch.zeros(sm.num_classes, dtype=torch.long)
    for row in plan_rows(index, {ESTIMATION: m}, chunk) if m else []:
        out += sm.count_row(x, row, seed)
    return out.numpy()


def iss_counts(sm: Smoother, x: torch.Tensor, plan: SampleSizePlan, *, index: int, seed: int, n0: int,
               chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """``(selection counts, estimation counts)`` of one image: the pilot, then ``plan.size_for(pilot)``
    fresh draws. This is what a counting actor does with an ISS row."""
    import torch

    sel = torch.zeros(sm.num_classes, dtype=torch.long)
    for row in plan_rows(index, {SELECTION: n0}, chunk):
        sel += sm.count_row(x, row, seed)
    sel_np = sel.numpy()
    return sel_np, estimation_counts(sm, x, index=index, seed=seed, m=plan.size_for(sel_np), chunk=chunk)


def certify_iss(sm: Smoother, x: torch.Tensor, plan: SampleSizePlan, *, n0: int, alpha: float, seed: int = 0, index: int = 0,
                chunk: int = 10_000) -> tuple[Certificate, np.ndarray, np.ndarray]:
    """CERTIFY one image with input-specific sampling: ``(certificate, selection, estimation counts)``;
    the single-device reference of the Ray Data job's ISS rows."""
    sel, est = iss_counts(sm, x, plan, index=index, seed=seed, n0=n0, chunk=chunk)
    return certify_from_counts(sel, est, sm.sigma, alpha), sel, est
