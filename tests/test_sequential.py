"""Sequential certification (Voracek, NeurIPS 2024): the confidence sequence, the draws it uses,
and soundness against classifiers whose ``p_y`` is known in closed form (and the failure of an
unsound variant that recomputes a Clopper-Pearson interval at every look)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.special import betaincinv
from scipy.stats import binom, ncx2, norm
from torch import nn

from rayrcm.certify import Smoother
from rayrcm.certify.iss import estimation_counts
from rayrcm.certify.sequential import (
    CERTIFIED,
    REFUTED,
    UNDECIDED,
    Drawn,
    ImageSequence,
    certify_sequential,
    confidence_interval,
    decide,
    log_mixture,
    reach,
    run_sequences,
    thresholds,
)
from rayrcm.certify.stats import max_certifiable_radius

# ----------------------------------------------------------------------------- the confidence sequence


def test_the_interval_is_where_the_mixture_stays_below_one_over_alpha():
    for a, t, alpha in ((70, 100, 0.01), (1000, 1000, 0.001), (3, 500, 0.05), (0, 200, 0.001)):
        lo, hi = confidence_interval(a, t, alpha)
        assert lo <= a / t <= hi
        for p in np.linspace(0.001, 0.999, 999):  # inside <=> M_t(p) < 1 / alpha (up to the root's tolerance)
            inside = float(log_mixture(a, t, p)) < math.log(1 / alpha)
            if abs(p - lo) > 1e-9 and abs(p - hi) > 1e-9:
                assert inside == (lo < p < hi), (a, t, p, lo, hi)


def test_the_mixture_is_the_product_of_the_kt_bets():
    """Voracek's ``get_thresholds`` bets ``q = (A + 1/2) / (N + 1)`` sample by sample; the product of those
    likelihood ratios is the closed-form Beta(1/2, 1/2) mixture whatever the order of the draws."""
    rng = np.random.default_rng(0)
    x, p = rng.random(300) < 0.8, 0.7
    log_kt, a = 0.0, 0
    for n, xi in enumerate(x):
        q = (a + 0.5) / (n + 1)
        log_kt += math.log(q if xi else 1 - q) - math.log(p if xi else 1 - p)
        a += int(xi)
    assert float(log_mixture(a, len(x), p)) == pytest.approx(log_kt, rel=1e-10)


def test_decisions_are_the_interval_against_each_threshold():
    q = thresholds([0.0, 0.25, 0.5], 0.25)
    assert q == pytest.approx(norm.cdf([0, 1, 2]))  # Phi(r / sigma), not its inverse
    for a, t in ((980, 1000), (700, 1000), (400, 1000), (1000, 1000)):
        cert, refu = decide(np.array(a), np.array(t), q, 0.001)
        lo, hi = confidence_interval(a, t, 0.001)
        assert cert.tolist() == (q < lo).tolist() and refu.tolist() == (q > hi).tolist()


def test_the_reach_is_below_the_fixed_protocols():
    fixed, seq = max_certifiable_radius(100_000, 0.001, 0.25), reach(100_000, 0.001, 0.25)
    assert 0.85 < seq < fixed < 0.96  # looking at every block costs a little reach


def test_an_image_stops_when_every_radius_is_decided_or_at_the_cap():
    radii = [0.0, 0.25, 0.5]
    state = ImageSequence(thresholds(radii, 0.25), 0.001, 100_000, 100)
    used = state.update(np.full(50, 100))  # every draw succeeds: all three decided long before 5,000
    assert state.stopped and used < 50 and state.t == 100 * used and (state.decisions == CERTIFIED).all()
    assert state.update(np.full(5, 100)) == 0  # a stopped image takes nothing more
    capped = ImageSequence(thresholds(radii, 0.25), 0.001, 1000, 100)
    capped.update(np.full(20, 84))  # p about Phi(1): r = 0.25 stays undecided
    assert capped.stopped and capped.t == 1000 and capped.decisions.tolist() == [CERTIFIED, UNDECIDED, REFUTED]


# ----------------------------------------------------------------------------- the draws


class Wedge(nn.Module):
    """Class 1 where ``w1.x > b1`` and ``w2.x > b2`` (``w1``, ``w2`` orthonormal), else 0: under
    N(0, sigma^2 I) the two margins move independently, so ``P[f = 1] = Phi(m1/sigma) Phi(m2/sigma)``."""

    def __init__(self, seed: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w, _ = torch.linalg.qr(torch.randn(16, 2, generator=g, dtype=torch.float64))
        self.w, self.b = w.T.contiguous(), torch.randn(2, generator=g, dtype=torch.float64)

    def forward(self, x):
        m = x.flatten(1).double() @ self.w.T - self.b
        on = ((m[:, 0] > 0) & (m[:, 1] > 0)).long()
        return torch.nn.functional.one_hot(on, 2).float()

    def p_one(self, x: torch.Tensor, sigma: float) -> float:
        m = x.flatten().double() @ self.w.T - self.b
        return float(norm.cdf(m[0].item() / sigma) * norm.cdf(m[1].item() / sigma))

    def point(self, p1: float, gen: torch.Generator, sigma: float) -> torch.Tensor:
        """An input with ``P[f = 1] = p1``: margins with ``Phi(m1/sigma) = u``, ``Phi(m2/sigma) = p1 / u``."""
        u = p1 ** (0.5 * torch.rand(1, generator=gen).item())  # u in [sqrt(p1), 1)
        m = sigma * norm.ppf([u, p1 / u])
        x0 = torch.rand(16, generator=gen, dtype=torch.float64)
        x = x0 + ((torch.tensor(m) + self.b) - self.w @ x0) @ self.w
        return x.float().view(1, 4, 4)


class Ball(nn.Module):
    """Class 1 inside the ball ``|x - c| < rho`` (16 pixels), else 0: ``|x + d - c|^2 / sigma^2`` is
    noncentral chi-square (16 degrees, noncentrality ``|x - c|^2 / sigma^2``), so ``P[f = 1]`` is exact."""

    def __init__(self, rho: float = 3.5, seed: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c, self.rho = torch.rand(16, generator=g, dtype=torch.float64), rho

    def forward(self, x):
        inside = ((x.flatten(1).double() - self.c).pow(2).sum(1) < self.rho ** 2).long()
        return torch.nn.functional.one_hot(inside, 2).float()

    def p_one(self, x: torch.Tensor, sigma: float) -> float:
        d2 = float((x.flatten().double() - self.c).pow(2).sum())
        return float(ncx2.cdf(self.rho ** 2 / sigma ** 2, 16, d2 / sigma ** 2))

    def point(self, p1: float, gen: torch.Generator, sigma: float) -> torch.Tensor:
        f = lambda d: float(ncx2.cdf(self.rho ** 2 / sigma ** 2, 16, d * d / sigma ** 2)) - p1  # noqa: E731
        d = brentq(f, 1e-9, 20.0)
        u = torch.randn(16, generator=gen, dtype=torch.float64)
        return (self.c + d * u / u.norm()).float().view(1, 4, 4)


def test_the_draws_are_the_fixed_protocols_and_do_not_depend_on_batching():
    model, sigma = Wedge(), 0.5
    gen = torch.Generator().manual_seed(0)
    xs = torch.cat([model.point(p, gen, sigma) for p in (0.6, 0.8, 0.93, 0.99)])[:, None]
    radii = [0.0, 0.25, 0.5, 0.75]
    big = Smoother(model, 2, sigma=sigma, batch=2000, device="cpu")
    together = run_sequences(big, xs, [1] * 4, [10, 11, 12, 13], radii=radii, alpha=0.001, n_max=20_000, seed=5, chunk=700)
    for i, res in enumerate(together):  # the first t draws of the fixed protocol's estimation stream
        est = estimation_counts(big, xs[i], index=10 + i, seed=5, m=res.samples, chunk=700)
        assert est.sum() == res.samples and est[1] == res.successes
        alone = certify_sequential(Smoother(model, 2, sigma=sigma, batch=100, device="cpu"), xs[i], 1, radii=radii,
                                   alpha=0.001, n_max=20_000, seed=5, index=10 + i, chunk=700)
        assert alone == res  # one image at a time, batch 100: the same certificate


def test_a_batched_actor_draws_ahead_at_most_twice_what_it_uses():
    model = Wedge()
    gen = torch.Generator().manual_seed(1)
    xs = torch.cat([model.point(float(p), gen, 0.5) for p in np.linspace(0.55, 0.99, 16)])[:, None]
    drawn = Drawn()
    run_sequences(Smoother(model, 2, sigma=0.5, batch=4000, device="cpu"), xs, [1] * 16, list(range(16)),
                  radii=[0.0, 0.5], alpha=0.001, n_max=10_000, seed=0, chunk=1000, drawn=drawn)
    assert drawn.used <= drawn.made <= 2 * drawn.used


# ----------------------------------------------------------------------------- soundness, known truth

RADII, SIGMA, ALPHA, N_MAX = (0.0, 0.25, 0.5, 0.75, 1.0), 0.5, 0.01, 5000


class ClopperPearsonEveryLook(ImageSequence):
    """Deliberately unsound: a (1 - alpha) Clopper-Pearson interval recomputed at every look (each valid
    for a fixed n, not for a stopping time chosen by looking)."""

    def looks(self, a, t):
        a, t = np.asarray(a, float)[:, None], np.asarray(t, float)[:, None]
        with np.errstate(all="ignore"):
            lo = np.where(a > 0, betaincinv(np.maximum(a, 1e-9), t - a + 1, self.alpha), 0.0)
            hi = np.where(a < t, betaincinv(a + 1, np.maximum(t - a, 1e-9), 1 - self.alpha), 1.0)
        return lo > self.q, hi < (self.q if self.q_refute is None else self.q_refute)


def _cases(rng: np.random.Generator, count: int, q: np.ndarray | None = None, side: float = -1.0):
    """``count`` images on each classifier, label and ``p_y`` exact: 70 % with ``p_y`` just below a
    threshold ``q`` (``side = +1``: just above; within 2 % of the distance to 1: where a look-happy test
    errs), 30 % spread over (0.5, 0.999)."""
    q = thresholds(RADII, SIGMA) if q is None else q
    gen = torch.Generator().manual_seed(0)
    for model in (Wedge(), Ball()):
        xs, labels, truth = [], [], []
        for _ in range(count):
            j = rng.integers(len(q))
            near = min(q[j] + side * rng.uniform(0, 0.02) * (1 - q[j]), 0.9999)
            p = near if rng.random() < 0.7 else rng.uniform(0.5, 0.999)
            label = int(rng.random() < 0.5)  # test class 1 at p or class 0 at p (class 1 at 1 - p)
            x = model.point(p if label else 1 - p, gen, SIGMA)
            p1 = model.p_one(x, SIGMA)  # the truth of the float32 input actually certified
            xs.append(x)
            labels.append(label)
            truth.append(p1 if label else 1 - p1)
        yield model, torch.stack(xs), labels, np.array(truth)


def test_sequential_certificates_are_sound_and_clopper_pearson_at_every_look_is_not():
    """1,200 images x 5 radii = 6,000 decisions at alpha = 0.01. An image is wrong when *any* radius is
    certified with ``p_y <= Phi(r / sigma)``; the CS makes that happen with probability <= alpha per
    image, so the count wrong must be plausible under Binomial(1200, alpha) (upper tail p > 1e-3).
    The same images and draws through a Clopper-Pearson interval recomputed at every look fail it."""
    q = thresholds(RADII, SIGMA)
    rng = np.random.default_rng(0)
    wrong = peeked = images = certified = spent = 0
    for model, xs, labels, p_y in _cases(rng, 600):
        sm = Smoother(model, 2, sigma=SIGMA, batch=20_000, device="cpu")
        for kind in (ImageSequence, ClopperPearsonEveryLook):
            res = run_sequences(sm, xs, labels, list(range(len(xs))), radii=RADII, alpha=ALPHA, n_max=N_MAX, seed=1,
                                chunk=1000, kind=kind)
            dec = np.array([r.decisions for r in res])
            bad = int(np.sum(np.any((dec == CERTIFIED) & (q[None, :] >= p_y[:, None]), axis=1)))
            if kind is ImageSequence:
                wrong += bad
                certified += int(np.sum(dec == CERTIFIED))
                spent += sum(r.samples for r in res)
                # the radius of the stopped interval is sound too: sigma Phi^-1(L) <= sigma Phi^-1(p_y) but rarely
                assert sum(r.radius > SIGMA * norm.ppf(p) + 1e-9 for r, p in zip(res, p_y) if p > 0.5) <= bad + 2
            else:
                peeked += bad
        images += len(xs)
    p_sound, p_peek = binom.sf(wrong - 1, images, ALPHA), binom.sf(peeked - 1, images, ALPHA)
    print(f"wrong {wrong}/{images} (p={p_sound:.3g}); CP at every look {peeked} (p={p_peek:.3g}); "
          f"{certified} certified decisions; {spent / images:.0f} samples/image")
    assert images * len(RADII) >= 5000
    assert p_sound > 1e-3, f"{wrong} images wrongly certified of {images} (p = {p_sound:.2g})"
    assert p_peek < 1e-3, f"the unsound variant went unnoticed: {peeked} wrong (p = {p_peek:.2g})"
    assert certified > 0.3 * images * len(RADII) and spent < 0.95 * images * N_MAX  # it certifies, and stops early


def test_an_image_below_one_half_is_refuted_everywhere():
    model = Wedge()
    x = model.point(0.2, torch.Generator().manual_seed(2), 0.5)
    res = certify_sequential(Smoother(model, 2, sigma=0.5, device="cpu"), x, 1, radii=[0.0, 0.5], alpha=0.001,
                             n_max=10_000)
    assert res.decisions == (REFUTED, REFUTED) and res.radius == 0.0 and res.p_upper < 0.5 and res.samples < 1000


TOLERANCE = 0.1


def test_a_radius_tolerance_stops_an_image_at_a_threshold_long_before_the_cap():
    model, radii = Wedge(), [0.0, 0.5]
    x = model.point(float(thresholds([0.52], 0.5)[0]), torch.Generator().manual_seed(3), 0.5)  # radius 0.52: just above 0.5
    sm = Smoother(model, 2, sigma=0.5, batch=2000, device="cpu")
    plain = certify_sequential(sm, x, 1, radii=radii, alpha=0.001, n_max=50_000)
    tolerant = certify_sequential(sm, x, 1, radii=radii, alpha=0.001, n_max=50_000, tolerance=TOLERANCE)
    assert plain.samples == 50_000 and plain.decisions == (CERTIFIED, UNDECIDED)  # no interval of the cap separates it
    assert tolerant.decisions == (CERTIFIED, REFUTED) and tolerant.samples < 10_000  # its radius is shown < 0.6
    assert tolerant.p_upper < thresholds([0.5 + TOLERANCE], 0.5)[0]


def test_refutations_within_the_tolerance_are_sound_and_clopper_pearson_at_every_look_is_not():
    """A refutation at ``r`` with tolerance states ``p_y < Phi((r + tolerance) / sigma)``: 1,200 images with
    ``p_y`` mostly just above those thresholds (where a refutation errs); per image the event that any
    radius is wrongly refuted or wrongly certified must be plausible under Binomial(1200, alpha), and the
    same draws through a Clopper-Pearson interval at every look must fail it."""
    q, q_refute = thresholds(RADII, SIGMA), thresholds(np.add(RADII, TOLERANCE), SIGMA)
    rng = np.random.default_rng(1)
    wrong = peeked = images = 0
    for model, xs, labels, p_y in _cases(rng, 600, q_refute, side=+1.0):
        sm = Smoother(model, 2, sigma=SIGMA, batch=20_000, device="cpu")
        for kind in (ImageSequence, ClopperPearsonEveryLook):
            res = run_sequences(sm, xs, labels, list(range(len(xs))), radii=RADII, alpha=ALPHA, n_max=N_MAX, seed=2,
                                chunk=1000, kind=kind, tolerance=TOLERANCE)
            dec = np.array([r.decisions for r in res])
            bad = ((dec == REFUTED) & (q_refute[None, :] <= p_y[:, None])) | ((dec == CERTIFIED) & (q[None, :] >= p_y[:, None]))
            if kind is ImageSequence:
                wrong += int(np.sum(bad.any(axis=1)))
            else:
                peeked += int(np.sum(bad.any(axis=1)))
        images += len(xs)
    p_sound, p_peek = binom.sf(wrong - 1, images, ALPHA), binom.sf(peeked - 1, images, ALPHA)
    print(f"wrong {wrong}/{images} (p={p_sound:.3g}); CP at every look {peeked} (p={p_peek:.3g})")
    assert p_sound > 1e-3, f"{wrong} images wrongly decided of {images} (p = {p_sound:.2g})"
    assert p_peek < 1e-3, f"the unsound variant went unnoticed: {peeked} wrong (p = {p_peek:.2g})"
