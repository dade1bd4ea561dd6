"""Sequential certification: certified accuracy at a grid of radii from an anytime-valid
confidence sequence, stopping each image as soon as every radius is decided.

Voracek, "Treatment of Statistical Estimation Problems in Randomized Smoothing for Adversarial
Robustness" (NeurIPS 2024; code: vvoracek/RS_conf_seq, ``thresholds.py``/``core.py``). For an
image with label ``y`` and ``p = P[f(x + sigma z) = y]``, Cohen et al.'s Theorem 1 says the
smoothed classifier returns ``y`` within the L2 ball of radius ``r`` when ``p > Phi(r / sigma)``.
Papers report certified accuracy at a few radii, which needs, per image and radius, only the
decision ``p > q_r = Phi(r / sigma)``: a test, not an estimate, and a test can stop early.

The confidence sequence (CS). After ``t`` draws with ``a`` successes (``f = y``), the
Krichevsky-Trofimov (Beta(1/2, 1/2)) mixture of likelihood ratios

    M_t(p) = B(a + 1/2, t - a + 1/2) / B(1/2, 1/2) / (p^a (1 - p)^(t - a))

is a nonnegative martingale with ``M_0 = 1`` under the true ``p`` (a mixture of the likelihood
ratios ``prod (theta / p)^X ((1 - theta) / (1 - p))^(1 - X)``, each a martingale; Robbins 1970;
the KT betting strategy of Waudby-Smith & Ramdas, JRSS-B 2023, and Voracek's ``get_thresholds``,
whose bet ``q = (A + 1/2) / (N + 1)`` multiplies out to this mixture). Ville's inequality gives
``P[exists t: M_t(p) >= 1 / alpha] <= alpha``, so

    C_t = {p : M_t(p) < 1 / alpha} = [L_t, U_t]

(an interval: ``log M_t`` is convex in ``p``) covers ``p`` at *every* ``t`` at once with
probability ``>= 1 - alpha``: the stopping time may depend on the draws. One interval covers the
whole radius grid: no alpha is split between radii or between the two sides (Voracek's code
tests each side at ``alpha / 2``; the two-sided mixture needs no split).

Decisions. At each look (after every ``block`` draws) radius ``r`` is *certified* once
``L_t > q_r`` and *refuted* once ``U_t < q_r``; an image stops when every radius is decided, or at
the cap ``n_max``, where a radius still inside ``[L_t, U_t]`` counts as not certified
(conservative). With a radius ``tolerance`` (``smoothing.tolerance``, default 0) a radius is settled as
not certified once ``U_t < Phi((r + tolerance) / sigma)``: the interval shows the image's radius below
``r + tolerance``. Certificates are unchanged (so is their soundness); what the tolerance buys is an
early stop for an image whose ``p`` sits just above a threshold, which no interval of the cap's
draws can separate from it (it would otherwise run to the cap and count as not certified anyway),
at the price of reporting "not certified at ``r``" for an image whose radius is in ``[r, r +
tolerance)``. That statement (radius ``< r + tolerance``) is wrong with probability ``<= alpha``
too: the same Ville event. A wrong certificate (certified at ``r`` while ``p <= q_r``) needs ``M_t(p) >=
M_t(q_r) >= 1/alpha`` at some look (``M_t`` is monotone on each side of ``a / t``), the Ville event:
for each image, the probability that *any* radius is wrongly certified is ``<= alpha``. Deciding
with a Clopper-Pearson interval recomputed at every look instead is not sound (the tests show it).

``radius``: ``sigma * Phi^-1(L)`` at the stopping look, raised to the largest certified grid
radius when the interval certified it at an earlier look; either is sound. It is *not* the
fixed protocol's radius (an image stops once its grid is decided), so its average is no ACR.

The draws of image ``index`` are the fixed protocol's estimation stream for ``(seed, index)``
(:func:`~rayrcm.certify.smoothing.noise_seed` with role ``ESTIMATION``, rows of ``chunk``
draws, blocks of ``block``): the first ``t`` sequential draws are the first ``t`` estimation draws
of ``sampling=fixed``, so the two protocols are compared on the same noise, and the decisions
do not depend on which actor draws them, with what batch size, or next to which other images.
No selection draws: the label is the class tested.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

if TYPE_CHECKING:
    import torch

    from rayrcm.certify.smoothing import Smoother

CERTIFIED, REFUTED, UNDECIDED = 1, 0, -1
SEQ_ROW = 4  # the role of a sequential row of work: one image, drawn until its grid is decided


def log_mixture(a: np.ndarray | int, t: np.ndarray | int, p: np.ndarray | float) -> np.ndarray:
    """``log M_t(p)`` of the Beta(1/2, 1/2) mixture after ``t`` draws with ``a`` successes (broadcast)."""
    from scipy.special import betaln, xlog1py, xlogy

    a, t, p = np.asarray(a, np.float64), np.asarray(t, np.float64), np.asarray(p, np.float64)
    with np.errstate(divide="ignore"):
        return cast(np.ndarray, betaln(a + 0.5, t - a + 0.5) - betaln(0.5, 0.5) - xlogy(a, p) - xlog1py(t - a, -p))


def confidence_interval(a: int, t: int, alpha: float) -> tuple[float, float]:
    """``[L_t, U_t] = {p : M_t(p) < 1 / alpha}``; ``(0, 1)`` before any draw."""
    from scipy.optimize import brentq

    if t == 0:
        return 0.0, 1.0
    level = math.log(1 / alpha)

    def f(p: float) -> float:
        return float(log_mixture(a, t, p)) - level

    mid = min(max(a / t, 1e-300), 1 - 1e-16)
    lo = 0.0 if a == 0 or f(1e-300) < 0 else brentq(f, 1e-300, mid, xtol=1e-15, rtol=1e-14)
    hi = 1.0 if a == t or f(1 - 1e-16) < 0 else brentq(f, mid, 1 - 1e-16, xtol=1e-15, rtol=1e-14)
    return float(lo), float(hi)


def thresholds(radii: Sequence[float] | np.ndarray, sigma: float) -> np.ndarray:
    """``q_r = Phi(r / sigma)``: certified at ``r`` iff ``p > q_r`` (Cohen et al., Theorem 1)."""
    from scipy.stats import norm

    return cast(np.ndarray, norm.cdf(np.asarray(radii, np.float64) / sigma))


def reach(n_max: int, alpha: float, sigma: float) -> float:
    """The largest radius the CS can certify within ``n_max`` draws: ``sigma * Phi^-1(L)`` when every
    draw succeeds (below the fixed protocol's ``sigma * Phi^-1(alpha^(1/n))``: the price of looking
    at every block)."""
    from scipy.stats import norm

    return float(sigma * norm.ppf(confidence_interval(n_max, n_max, alpha)[0]))


def decide(a: np.ndarray, t: np.ndarray, q: np.ndarray, alpha: float,
           q_refute: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(certified, refuted)`` boolean arrays ``(..., R)`` for looks with ``a`` successes of ``t``
    (shape ``(...)``) against thresholds ``q`` ``(R,)``: ``q < L_t`` and ``q_refute > U_t``
    (``q_refute``: the thresholds at ``r + tolerance``; default ``q``)."""
    a, t = np.asarray(a, np.float64)[..., None], np.asarray(t, np.float64)[..., None]
    level = math.log(1 / alpha)
    out = log_mixture(a, t, q) >= level
    if q_refute is None:
        return out & (a > q * t), out & (a < q * t)
    return out & (a > q * t), (log_mixture(a, t, q_refute) >= level) & (a < q_refute * t)


@dataclass
class ImageSequence:
    """One image's state: successes and draws so far, and the decision per radius."""

    q: np.ndarray  # thresholds (R,)
    alpha: float
    n_max: int
    block: int
    q_refute: np.ndarray | None = None  # the thresholds at r + tolerance (None: q, no tolerance)
    a: int = 0
    t: int = 0
    decisions: np.ndarray | None = None
    stopped: bool = False

    def __post_init__(self) -> None:
        self.decisions = np.full(len(self.q), UNDECIDED, np.int8)

    def looks(self, a: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(certified, refuted)`` ``(looks, R)`` at looks with ``a`` successes of ``t`` draws: the CS."""
        return decide(a, t, self.q, self.alpha, self.q_refute)

    def update(self, block_successes: np.ndarray) -> int:
        """Take the successes of the next blocks (``block`` draws each) look by look; stop at the first
        look where every radius is decided or at the cap. Returns how many blocks were used (the
        rest, drawn ahead by a batched actor, are discarded)."""
        assert self.decisions is not None
        ks = np.asarray(block_successes, np.int64)
        used = 0
        if self.stopped or not len(ks):
            return 0
        a = self.a + np.cumsum(ks)
        t = self.t + self.block * np.arange(1, len(ks) + 1)
        cert, refu = self.looks(a, t)
        undecided = self.decisions == UNDECIDED
        for i in range(len(ks)):
            used = i + 1
            # a decision, once taken, stands: the running intersection of the intervals (if it ever empties,
            # the sequence has missed p_y, which happens with probability <= alpha)
            self.decisions[undecided & cert[i]] = CERTIFIED
            self.decisions[undecided & refu[i] & ~cert[i]] = REFUTED
            undecided = self.decisions == UNDECIDED
            if not undecided.any() or int(t[i]) >= self.n_max:
                self.stopped = True
                break
        self.a, self.t = int(a[used - 1]), int(t[used - 1])
        return used


@dataclass(frozen=True)
class SequentialResult:
    """One image's sequential certificate."""

    decisions: tuple[int, ...]  # per radius: CERTIFIED 1, REFUTED 0, UNDECIDED -1 (at the cap: not certified)
    successes: int
    samples: int
    p_lower: float
    p_upper: float
    radius: float  # sigma * Phi^-1(p_lower), or the largest certified grid radius if that is larger; 0 if none


def finish(decisions: Sequence[int] | np.ndarray, successes: int, samples: int, *, radii: Sequence[float], sigma: float,
           alpha: float) -> SequentialResult:
    """The certificate of a stopped sequence from its decisions and counts (what a counting actor returns)."""
    from scipy.stats import norm

    lo, hi = confidence_interval(int(successes), int(samples), alpha)
    radius = float(sigma * norm.ppf(lo)) if lo > 0.5 else 0.0
    certified = [float(r) for r, d in zip(radii, decisions) if int(d) == CERTIFIED]
    if certified:
        radius = max(radius, max(certified))
    return SequentialResult(tuple(int(d) for d in decisions), int(successes), int(samples), lo, hi, radius)


def result(state: ImageSequence, radii: Sequence[float], sigma: float) -> SequentialResult:
    assert state.decisions is not None
    return finish(state.decisions, state.a, state.t, radii=radii, sigma=sigma, alpha=state.alpha)


def sequential_record(label: int, decisions: Sequence[int], successes: int, samples: int, *, radii: Sequence[float],
                      sigma: float, alpha: float) -> dict[str, Any]:
    """A results row: ``predict`` is the label when the interval certified ``p_y > 1/2`` (the smoothed
    classifier returns it), else -1 (abstain: this procedure never names another class); ``radius``
    as :class:`SequentialResult`; ``decisions`` per radius of the protocol's ``radii``."""
    res = finish(decisions, successes, samples, radii=radii, sigma=sigma, alpha=alpha)
    certified = res.p_lower > 0.5 or CERTIFIED in res.decisions
    return {"predict": int(label) if certified else -1, "radius": res.radius if certified else 0.0,
            "n_a": res.successes, "n": res.samples, "p_a_lower": res.p_lower, "p_upper": res.p_upper,
            "samples": res.samples, "decisions": list(res.decisions)}


def new_state(radii: Sequence[float], sigma: float, alpha: float, n_max: int, block: int,
              kind: type[ImageSequence] = ImageSequence, tolerance: float = 0.0) -> ImageSequence:
    q_refute = thresholds(np.asarray(radii, np.float64) + tolerance, sigma) if tolerance > 0 else None
    return kind(thresholds(radii, sigma), alpha, n_max, block, q_refute)


class _Stream:
    """The estimation draws of one image, block after block: the generator of row ``c`` (seeded by
    ``(seed, index, ESTIMATION, c)``) gives ``chunk / block`` blocks, then row ``c + 1`` takes over,
    exactly as :meth:`~rayrcm.certify.smoothing.Smoother.count` draws the fixed protocol's rows."""

    def __init__(self, device: torch.device, seed: int, index: int, chunk: int, block: int) -> None:
        self.device, self.seed, self.index, self.per_row, self.block = device, seed, index, chunk // block, block
        self.row, self.left = -1, 0
        self.gen: torch.Generator | None = None

    def fill(self, out: torch.Tensor, sigma: float) -> None:
        import torch

        from rayrcm.certify.smoothing import ESTIMATION, noise_seed

        for b in range(len(out) // self.block):
            if self.left == 0:
                self.row += 1
                self.gen = torch.Generator(device=self.device).manual_seed(noise_seed(self.seed, self.index, ESTIMATION, self.row))
                self.left = self.per_row
            out[b * self.block:(b + 1) * self.block].normal_(0.0, sigma, generator=self.gen)
            self.left -= 1


@dataclass
class Drawn:
    """What a batch of sequences cost: the draws the protocol used, and those made (a batched actor
    draws ahead: the blocks beyond an image's stopping look are discarded)."""

    used: int = 0
    made: int = 0


def run_sequences(sm: Smoother, images: torch.Tensor, labels: Sequence[int], indices: Sequence[int], *, radii: Sequence[float], alpha: float,
                  n_max: int, seed: int, chunk: int, drawn: Drawn | None = None,
                  kind: type[ImageSequence] = ImageSequence, tolerance: float = 0.0) -> list[SequentialResult]:
    """Certify ``images`` (``(B, C, H, W)`` in [0, 1]) sequentially, side by side on ``sm``'s device.

    Each round, every undecided image gets its next blocks in one forward pass of at most
    ``sm.batch`` samples: as many as it has drawn so far (doubling, so at most half of its draws are
    drawn ahead of its stopping look) within an equal share of the batch. Successes are counted per
    block on the device and copied to the host once per round; the decisions are taken look by look
    (:meth:`ImageSequence.update`), so they do not depend on the batch, the round or the neighbours.
    ``kind``: the decision rule (a test's deliberately unsound variant overrides :meth:`ImageSequence.looks`);
    ``tolerance``: the radius tolerance of a refutation (module docstring).
    """
    import torch

    block = sm.block
    x_all = images.to(sm.device, torch.float32)
    states = [new_state(radii, sm.sigma, alpha, n_max, block, kind, tolerance) for _ in range(len(x_all))]
    streams = [_Stream(sm.device, seed, int(i), chunk, block) for i in indices]
    y_all = torch.as_tensor(np.asarray(labels, np.int64), device=sm.device)
    drawn = drawn if drawn is not None else Drawn()
    cap_blocks = -(-n_max // block)
    budget = max(1, sm.batch // block)
    active = list(range(len(states)))
    with torch.inference_mode():
        while active:
            now = active[:budget]
            share = max(1, budget // len(now))
            take = [min(max(1, states[i].t // block), share, cap_blocks - states[i].t // block) for i in now]
            total = sum(take) * block
            if sm._buf is None or sm._buf.shape[0] < total or sm._buf.shape[1:] != x_all.shape[1:]:
                sm._buf = torch.empty((max(total, sm.batch), *x_all.shape[1:]), device=sm.device)
            buf, start, ys = sm._buf[:total], 0, []
            for i, k in zip(now, take):
                part = buf[start:start + k * block]
                streams[i].fill(part, sm.sigma)
                part.add_(x_all[i])
                ys.append(y_all[i].expand(k * block))
                start += k * block
            batch = buf.contiguous(memory_format=torch.channels_last) if sm.channels_last else buf
            with sm._autocast():
                pred = sm.model(batch).argmax(1)
            per_block = (pred == torch.cat(ys)).view(-1, block).sum(1).cpu().numpy()
            drawn.made += total
            start = 0
            for i, k in zip(now, take):
                states[i].update(per_block[start:start + k])
                start += k
            active = [i for i in active if not states[i].stopped]
    drawn.used += sum(s.t for s in states)
    return [result(s, radii, sm.sigma) for s in states]


def certify_sequential(sm: Smoother, x: torch.Tensor, label: int, *, radii: Sequence[float], alpha: float, n_max: int, seed: int = 0,
                       index: int = 0, chunk: int = 10_000, tolerance: float = 0.0) -> SequentialResult:
    """One image's sequential certificate on one device: the reference of the Ray Data job's rows."""
    return run_sequences(sm, x[None], [label], [index], radii=radii, alpha=alpha, n_max=n_max, seed=seed, chunk=chunk,
                         tolerance=tolerance)[0]
