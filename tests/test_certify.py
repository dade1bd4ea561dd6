"""Randomized smoothing: the statistics, the noise, and soundness against a classifier whose
smoothed probabilities are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom, binomtest, norm
from torch import nn

from rayrcm.certify import (
    ABSTAIN,
    ESTIMATION,
    SELECTION,
    Smoother,
    certified_radius,
    certify,
    certify_from_counts,
    lower_confidence_bound,
    noise_seed,
    plan_rows,
    predict,
    predict_from_counts,
)

# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("n_a,n", [(0, 10), (7, 10), (10, 10), (99_000, 100_000), (512, 1000)])
def test_lower_bound_is_the_one_sided_clopper_pearson_bound(n_a, n):
    alpha = 0.001
    expected = 0.0 if n_a == 0 else beta.ppf(alpha, n_a, n - n_a + 1)  # one-sided exact binomial bound
    assert lower_confidence_bound(n_a, n, alpha) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_all_successes_bound_and_radius_by_hand():
    # nA = n: the bound solves p^n = alpha, so p = alpha^(1/n)
    p = lower_confidence_bound(100, 100, 0.001)
    assert p == pytest.approx(0.001 ** (1 / 100), rel=1e-9)
    assert certified_radius(p, 0.5) == pytest.approx(0.5 * norm.ppf(p), rel=1e-12)
    assert certified_radius(0.5, 0.5) == 0.0 and certified_radius(0.3, 0.5) == 0.0


def test_certify_from_counts_selects_on_selection_counts_only():
    sel = np.array([1, 90, 9])
    est = np.array([600, 300, 100])  # class 0 wins the estimation, but c_A comes from selection
    cert = certify_from_counts(sel, est, sigma=0.25, alpha=0.001)
    assert cert.top_class == 1 and cert.n_a == 300 and cert.n == 1000
    assert cert.prediction == ABSTAIN and cert.radius == 0.0
    cert = certify_from_counts(sel, np.array([10, 980, 10]), sigma=0.25, alpha=0.001)
    assert cert.prediction == 1
    assert cert.radius == pytest.approx(0.25 * norm.ppf(beta.ppf(0.001, 980, 21)))


def test_predict_from_counts_is_the_two_sided_binomial_test():
    counts = np.array([3, 60, 37, 0])
    pred = predict_from_counts(counts, alpha=0.05)
    assert (pred.n_a, pred.n_b) == (60, 37)
    assert pred.p_value == pytest.approx(binomtest(60, 97, 0.5).pvalue)
    assert pred.prediction == 1  # p = 0.025 < 0.05
    assert predict_from_counts(counts, alpha=0.01).prediction == ABSTAIN


# ----------------------------------------------------------------------------- the noise


class Recorder(nn.Module):
    """Keeps every input it sees; always answers class 0."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.k = num_classes

    def forward(self, x):
        self.seen.append(x.clone())
        out = torch.zeros(len(x), self.k)
        out[:, 0] = 1
        return out


def test_noise_is_sigma_in_pixel_units_and_added_outside_the_model():
    rec = Recorder()
    x = torch.rand(3, 8, 8)
    sm = Smoother(rec, 3, sigma=0.5, batch=500, device="cpu")
    counts = sm.count(x, 2000, noise_seed(0, 0, ESTIMATION, 0))
    assert counts.tolist() == [2000, 0, 0]
    z = torch.cat(rec.seen) - x  # the model received x + noise, in [0, 1] pixel units
    assert z.shape == (2000, 3, 8, 8)
    assert z.mean().item() == pytest.approx(0.0, abs=0.01)
    assert z.std().item() == pytest.approx(0.5, rel=0.01)


def test_noise_stream_does_not_depend_on_batch_size_and_rows_are_independent():
    x = torch.rand(1, 4, 4)
    streams = {}
    for batch in (100, 300, 1000):
        rec = Recorder()
        Smoother(rec, 3, sigma=0.25, batch=batch, block=100, device="cpu").count(x, 950, noise_seed(3, 7, ESTIMATION, 2))
        streams[batch] = torch.cat(rec.seen)
    assert torch.equal(streams[100], streams[300]) and torch.equal(streams[100], streams[1000])
    rec = Recorder()
    sm = Smoother(rec, 3, sigma=0.25, batch=100, device="cpu")
    for role, chunk in ((SELECTION, 0), (ESTIMATION, 0), (ESTIMATION, 1)):
        sm.count(x, 100, noise_seed(3, 7, role, chunk))
    a, b, c = rec.seen
    for u, v in ((a, b), (b, c), (a, c)):  # different rows draw different noise
        corr = torch.corrcoef(torch.stack([(u - x).flatten(), (v - x).flatten()]))[0, 1]
        assert abs(corr.item()) < 0.05


def test_plan_rows_covers_every_draw_once():
    rows = plan_rows(5, {SELECTION: 100, ESTIMATION: 100_000}, 30_000)
    assert [(r.role, r.chunk, r.num) for r in rows] == [
        (SELECTION, 0, 100), (ESTIMATION, 0, 30_000), (ESTIMATION, 1, 30_000), (ESTIMATION, 2, 30_000), (ESTIMATION, 3, 10_000)]
    assert noise_seed(0, 5, ESTIMATION, 1) != noise_seed(0, 5, ESTIMATION, 2) != noise_seed(1, 5, ESTIMATION, 1)


# ----------------------------------------------------------------------------- soundness, known truth


class Linear2(nn.Module):
    """f(x) = argmax(W x + b) on flattened (1, 4, 4) images: two classes."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(16, 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(2, 16, generator=g))
            self.lin.bias.copy_(torch.randn(2, generator=g))
        self.w = (self.lin.weight[1] - self.lin.weight[0]).detach().double()
        self.b = float((self.lin.bias[1] - self.lin.bias[0]).detach())

    def forward(self, x):
        return self.lin(x.flatten(1))

    def point_with_probability(self, p: float, gen: torch.Generator, sigma: float) -> tuple[torch.Tensor, int, float]:
        """An input whose smoothed top class has probability ``p`` (random side), its true class
        and its true robust radius. For a linear f, P[f(x + d) = 1] = Phi(margin / (sigma ||w||)),
        so g = f and g's robust radius is the distance to the hyperplane, |margin| / ||w||."""
        sign = 1 if torch.rand(1, generator=gen).item() < 0.5 else -1
        margin = sign * sigma * self.w.norm().item() * norm.ppf(p)
        x0 = torch.rand(16, generator=gen).double()
        x = x0 + (margin - (self.w @ x0 + self.b)) * self.w / self.w.norm() ** 2
        return x.float().view(1, 4, 4), int(sign > 0), abs(margin) / self.w.norm().item()


def _certificates(model, sigma, ps, n0, n, alpha, seed=0):
    sm = Smoother(model, 2, sigma=sigma, batch=1000, device="cpu")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, p in enumerate(ps):
        x, truth, true_radius = model.point_with_probability(float(p), gen, sigma)
        cert, _, est, _ = certify(sm, x, n0=n0, n=n, alpha=alpha, seed=seed, index=i, chunk=1000)
        out.append((cert, truth, true_radius, est))
    return out


def test_certified_radius_is_sound_against_the_closed_form_truth():
    """1,200 certificates at n = 200, alpha = 0.05, true p_A spread over (0.5, 0.999).

    A certificate is wrong when it does not abstain and either names the wrong class or claims
    a radius beyond the true one. Each is wrong with probability <= alpha (Cohen et al., Thm. 1
    and Prop. 2), so the number wrong is stochastically below Binomial(1200, alpha); we require
    it to be at most that distribution's 1 - 1e-6 quantile. The same test applied to the point
    estimate nA/n instead of the lower bound fails it: the test can tell sound from unsound.
    """
    model, sigma, alpha, n = Linear2(), 0.5, 0.05, 200
    ps = np.random.default_rng(0).uniform(0.5, 0.999, size=1200)
    certs = _certificates(model, sigma, ps, n0=50, n=n, alpha=alpha)
    wrong = sum(c.prediction != ABSTAIN and (c.prediction != t or c.radius > r + 1e-9) for c, t, r, _ in certs)
    limit = int(binom.ppf(1 - 1e-6, len(certs), alpha))
    assert wrong <= limit, f"{wrong} unsound certificates > {limit}"
    certified = sum(c.prediction != ABSTAIN for c, *_ in certs)
    assert certified > 0.7 * len(certs)  # and it does certify most points
    naive = sum(sigma * norm.ppf(min(est[c.top_class] / n, 1 - 1e-9)) > r + 1e-9 for c, t, r, est in certs if c.top_class == t)
    assert naive > limit


def test_with_large_n_the_radius_is_close_to_the_truth():
    model, sigma = Linear2(seed=1), 0.25
    for cert, truth, true_radius, _ in _certificates(model, sigma, [0.6, 0.75, 0.9, 0.95], n0=100, n=100_000, alpha=0.001):
        assert cert.prediction == truth
        assert true_radius - 0.06 * sigma <= cert.radius <= true_radius


def test_predict_agrees_with_the_true_class_far_from_the_boundary_and_abstains_on_it():
    model, sigma = Linear2(seed=2), 0.5
    sm = Smoother(model, 2, sigma=sigma, batch=1000, device="cpu")
    gen = torch.Generator().manual_seed(0)
    x, truth, _ = model.point_with_probability(0.9, gen, sigma)
    assert predict(sm, x, n=2000, alpha=0.001, index=0)[0].prediction == truth
    x, _, _ = model.point_with_probability(0.5, gen, sigma)
    assert predict(sm, x, n=2000, alpha=0.001, index=1)[0].prediction == ABSTAIN


def test_precision_and_memory_format_options_run_and_agree_on_an_easy_point():
    model = Linear2(seed=3)
    x, truth, _ = model.point_with_probability(0.999, torch.Generator().manual_seed(0), 0.25)
    for precision, cl in (("bf16", False), ("fp32", True)):
        sm = Smoother(model, 2, sigma=0.25, batch=500, device="cpu", precision=precision, channels_last=cl)
        cert, *_ = certify(sm, x, n0=100, n=2000, alpha=0.001)
        assert cert.prediction == truth and cert.radius > 0
    assert math.isfinite(cert.p_a_lower)


# ----------------------------------------------------------------------------- the job's pieces, without Ray


def _batch(rows, counts, device="cpu"):
    return {"pos": np.array([r["pos"] for r in rows]), "role": np.array([r["role"] for r in rows]),
            "chunk": np.array([r["chunk"] for r in rows]), "num": np.array([r["num"] for r in rows]),
            "counts": np.stack(counts), "seconds": np.full(len(rows), 0.5), "device": np.array([device] * len(rows))}


def test_collector_sums_rows_once_and_certifies_from_the_totals(tmp_path):
    from rayrcm.analysis.results import read_rows_dir
    from rayrcm.certify import CertifyConfig, SmoothingConfig
    from rayrcm.certify.collect import Collector
    from rayrcm.result_parts import write_part

    cfg = CertifyConfig(model="m", smoothing=SmoothingConfig(n0=100, n=1000, chunk=400, sigma=0.5))
    col = Collector(cfg, [20, 40], labels=[1, 0], num_classes=3)
    assert [(r["pos"], r["index"], r["role"], r["num"]) for r in col.rows][:4] == [
        (0, 20, SELECTION, 100), (0, 20, ESTIMATION, 400), (0, 20, ESTIMATION, 400), (0, 20, ESTIMATION, 200)]
    first = [r for r in col.rows if r["pos"] == 0]
    counts = [np.array([0, r["num"], 0]) if r["role"] == SELECTION else np.array([r["num"] // 10, r["num"] * 9 // 10, 0])
              for r in first]
    assert col.add(_batch(first[:2], counts[:2])) == []
    assert col.partial() == pytest.approx(2 / 4)  # a progress bar moves within the image: 2 of its 4 rows
    done = col.add(_batch(first[1:], counts[1:]))  # the second row again (a retried actor): counted once
    expected = certify_from_counts(np.array([0, 100, 0]), np.array([100, 900, 0]), 0.5, cfg.smoothing.alpha)
    assert len(done) == 1 and done[0]["idx"] == 20 and done[0]["n"] == 1000 and done[0]["correct"] == 1
    assert done[0]["radius"] == pytest.approx(expected.radius) and done[0]["time"] == pytest.approx(2.0)
    assert col.samples == 1100 and col.partial() == 0  # a finished image is no longer partial
    assert write_part(tmp_path / "rows", []) is None
    part = write_part(tmp_path / "rows", done)
    assert part.name.startswith("part-") and read_rows_dir(tmp_path)["idx"].tolist() == [20]


def test_count_actor_takes_typed_settings_and_loads_plugins_first(tmp_path, monkeypatch):
    import io
    import sys
    import types

    from helpers import make_model

    from rayrcm.certify import CertifyConfig, ComputeConfig
    from rayrcm.certify.collect import CountSettings
    from rayrcm.errors import ConfigError
    from rayrcm.orchestration.certify_actor import CountActor

    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(get=lambda ref: ref))  # refs are the objects
    blob = torch.load(make_model(tmp_path / "m.pt"), weights_only=True)
    blob["meta"]["export"] = "actor_plugged_kind"
    buf = io.BytesIO()
    torch.save(blob, buf)
    (tmp_path / "actor_plugged_kind.py").write_text(
        "from rayrcm.models.export import EXPORTS, ExportKind\n"
        "EXPORTS.register('actor_plugged_kind')(ExportKind(lambda meta: EXPORTS.get('classifier').build(meta), True))\n")
    monkeypatch.chdir(tmp_path)
    cfg = CertifyConfig(model="m", plugins=("actor_plugged_kind.py",), compute=ComputeConfig(batch=100))
    settings = CountSettings.from_config(cfg)
    assert settings.plugins == (str(tmp_path / "actor_plugged_kind.py"),) and settings.batch == 100
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    with pytest.raises(ConfigError, match="actor_plugged_kind"):
        CountActor(buf.getvalue(), images, CountSettings.from_config(CertifyConfig(model="m")))
    actor = CountActor(buf.getvalue(), images, settings)
    out = actor({"pos": np.array([1]), "index": np.array([7]), "role": np.array([ESTIMATION]), "chunk": np.array([0]),
                 "num": np.array([300])})
    assert out["counts"].shape == (1, 10) and out["counts"].sum() == 300 and out["device"].tolist() == ["cpu"]
