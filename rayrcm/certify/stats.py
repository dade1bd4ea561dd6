"""The statistics of randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019), from counts.

For a base classifier ``f`` and noise ``d ~ N(0, sigma^2 I)`` (pixel units), the smoothed
classifier is ``g(x) = argmax_c P[f(x + d) = c]``. Cohen et al.'s Theorem 1: if
``P[f(x + d) = c_A] >= p_A_lower > 1/2`` then ``g`` predicts ``c_A`` within the L2 ball of radius

    R = sigma * Phi^-1(p_A_lower).

``CERTIFY`` estimates ``p_A_lower`` as the one-sided ``(1 - alpha)`` Clopper-Pearson lower bound of
``n_A`` successes in ``n`` fresh draws (statsmodels' ``beta`` interval at level ``2 * alpha``,
whose lower end is the one-sided bound), and abstains when it is below 1/2. ``PREDICT`` returns
the top class of ``n`` draws unless a two-sided binomial test of the top two counts
(``n_A`` of ``n_A + n_B``, p = 1/2) has p-value above ``alpha`` (scipy ``binomtest``).
Both fail (return a wrong non-abstaining answer) with probability at most ``alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ABSTAIN = -1


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided ``(1 - alpha)`` Clopper-Pearson lower bound on a binomial proportion."""
    from statsmodels.stats.proportion import proportion_confint

    return float(proportion_confint(n_a, n, alpha=2 * alpha, method="beta")[0])


def certified_radius(p_a_lower: float, sigma: float) -> float:
    """``sigma * Phi^-1(p_A_lower)``; 0 when ``p_A_lower <= 1/2`` (no certificate)."""
    from scipy.stats import norm

    return float(sigma * norm.ppf(p_a_lower)) if p_a_lower > 0.5 else 0.0


def max_certifiable_radius(n: int, alpha: float, sigma: float) -> float:
    """The largest radius CERTIFY can return with ``n`` estimation draws: when all ``n`` land on
    ``c_A`` the one-sided Clopper-Pearson bound is ``alpha ** (1 / n)``, so no image can be
    certified beyond ``sigma * Phi^-1(alpha ** (1 / n))`` (0.615 at n = 1,000, alpha = 0.001,
    sigma = 0.25)."""
    return certified_radius(lower_confidence_bound(n, n, alpha), sigma)


@dataclass(frozen=True)
class Certificate:
    """One CERTIFY outcome. ``prediction`` is ``ABSTAIN`` (-1) with ``radius`` 0 when it abstains."""

    prediction: int
    radius: float
    top_class: int  # c_A, chosen from the selection counts
    n_a: int  # estimation draws that landed on c_A
    n: int
    p_a_lower: float


def certify_from_counts(selection: np.ndarray, estimation: np.ndarray, sigma: float, alpha: float) -> Certificate:
    """CERTIFY from per-class counts of the selection (n0) and the independent estimation (n) draws.

    ``c_A`` is the top class of ``selection`` (lowest index on ties); ``n_A = estimation[c_A]``.
    Counting every class during estimation and picking ``c_A`` afterwards is the same test as
    counting only ``c_A``: the estimation draws are independent of the selection draws. No
    estimation draws (an input-specific plan of 0) abstain with ``p_a_lower = 0``.
    """
    c_a = int(np.argmax(selection))
    n = int(np.sum(estimation))
    n_a = int(estimation[c_a])
    if n == 0:
        return Certificate(ABSTAIN, 0.0, c_a, 0, 0, 0.0)
    p = lower_confidence_bound(n_a, n, alpha)
    if p < 0.5:
        return Certificate(ABSTAIN, 0.0, c_a, n_a, n, p)
    return Certificate(c_a, certified_radius(p, sigma), c_a, n_a, n, p)


@dataclass(frozen=True)
class Prediction:
    prediction: int  # ABSTAIN (-1) when the test is not significant
    n_a: int
    n_b: int
    p_value: float


def predict_from_counts(counts: np.ndarray, alpha: float) -> Prediction:
    """PREDICT: top-two counts, two-sided binomial test at p = 1/2; abstain when ``p > alpha``."""
    from scipy.stats import binomtest

    order = np.argsort(-np.asarray(counts), kind="stable")
    c_a = int(order[0])
    n_a = int(counts[c_a])
    n_b = int(counts[order[1]]) if len(order) > 1 else 0
    p = float(binomtest(n_a, n_a + n_b, 0.5).pvalue) if n_a + n_b > 0 else 1.0
    return Prediction(ABSTAIN if p > alpha else c_a, n_a, n_b, p)
