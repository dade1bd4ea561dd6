"""Input-specific sampling (Chen et al., AAAI 2022): the sample-size table, the plan's
independence from the estimation draws, and soundness against classifiers whose smoothed
probabilities are known in closed form (and the failure of an unsound variant that stops where
the estimation counts look best)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.special import betaincinv
from scipy.stats import binom, norm
from torch import nn

from rayrcm.certify import (
    ABSTAIN,
    ESTIMATION,
    SampleSizePlan,
    Smoother,
    certify,
    certify_iss,
    noise_seed,
)
from rayrcm.certify.iss import estimation_counts, nominal_radius
from rayrcm.certify.protocol import (
    CertifyConfig,
    SmoothingConfig,
    protocol_dict,
    protocol_diff,
    validate_certify,
)
from rayrcm.certify.stats import certified_radius, lower_confidence_bound
from rayrcm.errors import ConfigError

# ----------------------------------------------------------------------------- the table


def test_nominal_radius_is_the_certify_radius_at_n_a_equal_m_p():
    for m, k in ((1000, 900), (5000, 2600), (5000, 2400), (200, 200)):
        want = certified_radius(lower_confidence_bound(k, m, 0.001), 0.5)
        assert float(nominal_radius(m, k / m, 0.001, 0.5)) == pytest.approx(want, rel=1e-9)
    assert float(nominal_radius(1000, 0.5, 0.001, 0.5)) == 0.0 and float(nominal_radius(0, 0.9, 0.001, 0.5)) == 0.0


@pytest.mark.parametrize("decline", ["absolute", "relative"])
def test_each_size_is_the_smallest_within_the_decline_budget(decline):
    n, sigma, alpha, budget, step = 20_000, 0.5, 0.001, 0.05, 100
    plan = SampleSizePlan(n=n, sigma=sigma, alpha=alpha, max_decline=budget, decline=decline, step=step)
    for p in (0.55, 0.7, 0.9, 0.99, 0.999, 1.0):
        m = int(plan.sizes[np.searchsorted(plan.grid, p)])
        full = float(nominal_radius(n, p, alpha, sigma))
        target = full - budget if decline == "absolute" else (1 - budget) * full
        if target <= 0:
            assert m == 0
            continue
        assert m % step == 0 and 0 < m <= n
        assert float(nominal_radius(m, p, alpha, sigma)) >= target - 1e-12
        assert m == step or float(nominal_radius(m - step, p, alpha, sigma)) < target  # the smallest
    # near p = 1/2 even the full n certifies less than the budget: abstain without estimation
    assert plan.sizes[0] == 0 and plan.size_for_interval(0.2, 0.45) == 0
    if decline == "absolute":  # confident images need the most draws (the reach of the bound grows with m)
        assert plan.sizes[-1] == plan.sizes.max()
    else:  # a relative budget is tightest where the radius is small: just above p = 1/2
        assert plan.sizes[np.nonzero(plan.sizes)[0][0]] == n


def test_the_interval_takes_the_largest_size_over_it_and_its_neighbours():
    plan = SampleSizePlan(n=20_000, sigma=0.25, alpha=0.001, max_decline=0.02)
    lo, hi = 0.8004, 0.9
    i, j = np.searchsorted(plan.grid, lo) - 1, np.searchsorted(plan.grid, hi)
    assert plan.size_for_interval(lo, hi) == plan.sizes[i:j + 1].max()
    assert plan.size_for_interval(0.9, 0.9) == max(plan.sizes[np.searchsorted(plan.grid, 0.9) - 1:][:2])
    # the pilot's two-sided Clopper-Pearson interval: 200 of 200 reaches p = 1, the costliest
    assert plan.size_for(np.array([0, 200, 0])) == plan.sizes[-1]


# ----------------------------------------------------------------------------- the draws


class Sign(nn.Module):
    """Class 1 when the first pixel is above 1/2: predictions that depend on the noise."""

    def forward(self, x):
        on = (x.flatten(1)[:, 0] > 0.5).float()
        return torch.stack([1 - on, on], 1)


def test_the_plan_reads_only_the_selection_draws_and_estimation_is_the_fixed_prefix():
    x = torch.full((1, 2, 2), 0.55)
    sm = Smoother(Sign(), 2, sigma=0.5, batch=300, block=100, device="cpu")
    plan = SampleSizePlan(n=3000, sigma=0.5, alpha=0.01, max_decline=0.05)
    cert, sel, est = certify_iss(sm, x, plan, n0=400, alpha=0.01, seed=5, index=9, chunk=1000)
    m = int(est.sum())
    assert m == plan.size_for(sel) and 0 < m < 3000 and m % 100 == 0
    # the selection draws are the fixed protocol's (same seed, image and rows) ...
    fixed, fsel, fest, _ = certify(sm, x, n0=400, n=3000, alpha=0.01, seed=5, index=9, chunk=1000)
    assert fsel.tolist() == sel.tolist()
    # ... and the estimation draws are the first m of the fixed protocol's stream
    assert estimation_counts(sm, x, index=9, seed=5, m=3000, chunk=1000).tolist() == fest.tolist()
    assert estimation_counts(sm, x, index=9, seed=5, m=m, chunk=1000).tolist() == est.tolist()
    # other estimation draws (another chunking: the selection row is the same, the estimation rows are
    # not) cannot change the plan: the size is a function of the selection counts alone
    _, sel2, est2 = certify_iss(sm, x, plan, n0=400, alpha=0.01, seed=5, index=9, chunk=500)
    assert sel2.tolist() == sel.tolist() and est2.sum() == m


def test_an_empty_plan_abstains_with_no_estimation_draws():
    sm = Smoother(Sign(), 2, sigma=0.5, batch=100, device="cpu")
    # p_A is about 1/2, and a decline budget of 0.3 exceeds what even n draws would certify there
    plan = SampleSizePlan(n=2000, sigma=0.5, alpha=0.01, max_decline=0.3)
    cert, sel, est = certify_iss(sm, torch.full((1, 2, 2), 0.5), plan, n0=400, alpha=0.01, seed=0, index=0, chunk=1000)
    assert est.sum() == 0 and cert.prediction == ABSTAIN and cert.radius == 0.0 and cert.p_a_lower == 0.0


# ----------------------------------------------------------------------------- soundness, known truth


class Band3(nn.Module):
    """Three classes by the position of ``s = w.x`` (``w`` a unit vector of the 16 pixels):
    0 below ``a``, 1 in ``[a, b)``, 2 from ``b``. Under N(0, sigma^2 I) noise ``s`` moves by
    ``sigma N(0, 1)``, so ``P[f = 0] = Phi((a - s)/sigma)``, ``P[f = 2] = 1 - Phi((b - s)/sigma)``;
    the smoothed classifier depends on ``s`` alone and its true robust radius at ``x`` is the
    distance from ``s`` to the nearest ``s'`` where its argmax changes."""

    def __init__(self, a: float = 0.0, b: float = 0.6, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(16, generator=g, dtype=torch.float64)
        self.w, self.a, self.b = w / w.norm(), a, b

    def forward(self, x):
        s = x.flatten(1).double() @ self.w
        out = torch.zeros(len(x), 3)
        out[torch.arange(len(x)), (s >= self.a).long() + (s >= self.b).long()] = 1
        return out

    def probs(self, s, sigma: float) -> np.ndarray:
        lo, hi = norm.cdf((self.a - s) / sigma), norm.cdf((self.b - s) / sigma)
        return np.stack([lo, hi - lo, 1 - hi], -1)

    def boundaries(self, sigma: float) -> np.ndarray:
        """Where the smoothed classifier's answer changes: each change of the argmax on a fine
        grid of ``s``, refined by ``brentq`` on the difference of the two classes involved."""
        grid = np.linspace(self.a - 6 * sigma, self.b + 6 * sigma, 200_001)
        top = self.probs(grid, sigma).argmax(1)
        edges = []
        for k in np.nonzero(np.diff(top))[0]:
            c, d = top[k], top[k + 1]
            edges.append(brentq(lambda t, c=c, d=d: self.probs(t, sigma)[c] - self.probs(t, sigma)[d], grid[k], grid[k + 1]))
        return np.array(edges)

    def truth(self, s: float, sigma: float, edges: np.ndarray) -> tuple[int, float]:
        """The smoothed class at ``s`` and its true robust radius (the distance to the nearest edge)."""
        return int(self.probs(s, sigma).argmax()), float(np.min(np.abs(edges - s)))

    def point(self, s: float, gen: torch.Generator) -> torch.Tensor:
        x0 = torch.rand(16, generator=gen, dtype=torch.float64)
        return (x0 + (s - self.w @ x0) * self.w).float().view(1, 4, 4)


class Linear2(nn.Module):
    """f(x) = 1[w.x + b > 0]: P[f(x + d) = 1] = Phi(margin / sigma) for unit ``w``; g = f and its
    robust radius is the distance to the hyperplane."""

    def __init__(self, seed: int = 1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(16, generator=g, dtype=torch.float64)
        self.w, self.b = w / w.norm(), float(torch.randn(1, generator=g))

    def forward(self, x):
        on = (x.flatten(1).double() @ self.w + self.b > 0).long()
        out = torch.zeros(len(x), 2)
        out[torch.arange(len(x)), on] = 1
        return out

    def point(self, p: float, gen: torch.Generator, sigma: float) -> tuple[torch.Tensor, int, float]:
        sign = 1 if torch.rand(1, generator=gen).item() < 0.5 else -1
        margin = sign * sigma * norm.ppf(p)
        x0 = torch.rand(16, generator=gen, dtype=torch.float64)
        x = x0 + (margin - (self.w @ x0 + self.b)) * self.w
        return x.float().view(1, 4, 4), int(sign > 0), abs(margin)


SIGMA, ALPHA, N0, N_MAX = 0.5, 0.01, 200, 5000


def _cases():
    """2,400 images with known truth: 1,200 on a linear two-class f, 1,200 on the three-class band."""
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    lin, band = Linear2(), Band3()
    for p in rng.uniform(0.5, 0.999, 1200):
        yield (lin, 2, *lin.point(float(p), gen, SIGMA))
    edges = band.boundaries(SIGMA)
    assert len(edges) == 2  # 0 | 1 | 2 with this band width
    for s in rng.uniform(band.a - 2.5 * SIGMA, band.b + 2.5 * SIGMA, 1200):
        truth, radius = band.truth(float(s), SIGMA, edges)
        yield band, 3, band.point(float(s), gen), truth, radius


def _best_look(sm, x, index):
    """Deliberately unsound: the Clopper-Pearson bound after every 100 estimation draws up to the
    full budget, keeping the look where it is highest (stopping where the estimation counts look
    best)."""
    counts, best, k = np.zeros(sm.num_classes, np.int64), 0.0, 0
    top = None
    for look in range(N_MAX // 100):
        counts += sm.count(x, 100, noise_seed(99, index, ESTIMATION, look)).numpy()
        top = int(np.argmax(counts)) if top is None else top
        k += 100
        best = max(best, float(betaincinv(max(counts[top], 1e-9), k - counts[top] + 1, ALPHA)))
    return top, best


def test_input_specific_certificates_are_sound_and_a_best_look_variant_is_not():
    """Each certificate (ISS: the plan from the pilot, fresh estimation draws) is wrong with
    probability <= alpha: wrong class without abstaining, or a radius beyond the true one. Over
    2,400 certificates the count of wrong ones must be plausible under Binomial(2400, alpha)
    (upper-tail p > 1e-3). The same check on a variant that peeks at the estimation counts every
    100 draws and keeps the best bound fails it (p < 1e-3)."""
    plan = SampleSizePlan(n=N_MAX, sigma=SIGMA, alpha=ALPHA, max_decline=0.05)
    smoothers, wrong, peeked, certified, spent, total = {}, 0, 0, 0, 0, 0
    for i, (model, k, x, truth, radius) in enumerate(_cases()):
        sm = smoothers.setdefault(id(model), Smoother(model, k, sigma=SIGMA, batch=1000, device="cpu"))
        cert, sel, est = certify_iss(sm, x, plan, n0=N0, alpha=ALPHA, seed=0, index=i, chunk=1000)
        total += 1
        spent += int(sel.sum() + est.sum())
        if cert.prediction != ABSTAIN:
            certified += 1
            wrong += cert.prediction != truth or cert.radius > radius + 1e-9
        if est.sum():
            top, bound = _best_look(sm, x, i)
            if bound > 0.5:
                peeked += top != truth or SIGMA * norm.ppf(bound) > radius + 1e-9
    p_sound = binom.sf(wrong - 1, total, ALPHA)
    p_peek = binom.sf(peeked - 1, total, ALPHA)
    assert p_sound > 1e-3, f"{wrong} wrong of {total} certificates (p = {p_sound:.2g})"
    assert p_peek < 1e-3, f"the unsound variant went unnoticed: {peeked} wrong (p = {p_peek:.2g})"
    assert certified > 0.6 * total  # it does certify
    assert spent < 0.5 * total * (N0 + N_MAX)  # and spends far less than the fixed protocol
    print(f"wrong {wrong} (p={p_sound:.3g}), best-look wrong {peeked} (p={p_peek:.3g}), certified {certified}/{total}, "
          f"samples {spent / total:.0f}/image")


# ----------------------------------------------------------------------------- the protocol


def test_config_errors_are_one_line():
    good = CertifyConfig(model="m.pt", smoothing=SmoothingConfig(sampling="iss"))
    assert validate_certify(good) is good
    for bad, key in ((SmoothingConfig(sampling="adaptive"), "sampling"),
                     (SmoothingConfig(sampling="iss", max_decline=0.0), "max_decline"),
                     (SmoothingConfig(sampling="iss", decline="relative", max_decline=1.5), "max_decline"),
                     (SmoothingConfig(sampling="iss", decline="squared"), "decline")):
        with pytest.raises(ConfigError, match=key) as err:
            validate_certify(CertifyConfig(model="m.pt", smoothing=bad))
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="predict"):
        validate_certify(CertifyConfig(model="m.pt", mode="predict", smoothing=SmoothingConfig(sampling="iss")))


def test_a_rerun_with_another_sampling_mode_is_a_protocol_change():
    def proto(**kw):
        return protocol_dict(CertifyConfig(model="m", smoothing=SmoothingConfig(**kw)), dataset="digits",
                             model_sha256="0" * 64, num_classes=10, indices=[0, 1])

    fixed, iss = proto(), proto(sampling="iss")
    assert protocol_diff(fixed, fixed) == [] and protocol_diff(iss, iss) == []
    assert protocol_diff(fixed, iss) and protocol_diff(iss, fixed)
    assert protocol_diff(iss, proto(sampling="iss", max_decline=0.1))
    older = {k: v for k, v in fixed.items() if k != "sampling"}  # written before sampling was recorded
    assert protocol_diff(older, fixed) == [] and protocol_diff(older, iss)


def test_the_command_line_flags_set_the_sampling_keys():
    from rayrcm.cli import _parser, certify_config

    args = _parser().parse_args(["certify", "--model", "m.pt", "--sampling", "iss", "--max-decline", "0.1",
                                 "--decline", "relative", "--n0", "1000"])
    s = certify_config(args).smoothing
    assert (s.sampling, s.max_decline, s.decline, s.n0) == ("iss", 0.1, "relative", 1000)
    assert certify_config(_parser().parse_args(["certify", "--model", "m.pt"])).smoothing.sampling == "fixed"
    with pytest.raises(SystemExit):  # predict has no sampling flag
        _parser().parse_args(["predict", "--model", "m.pt", "--sampling", "iss"])
