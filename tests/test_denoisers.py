"""Denoisers: the DDS timestep tables, the one-shot formula with an oracle eps-model, the OpenAI
checkpoint adapter (with a small module written here), and the closed-form Wiener denoiser."""

from __future__ import annotations

import hashlib
import math
import textwrap

import pytest
import torch

from rayrcm.data.datasets import digits_tensors
from rayrcm.errors import ConfigError
from rayrcm.models.denoisers import (
    SCHEDULE_PRESETS,
    CovarianceWienerDenoiser,
    DiffusionSchedule,
    EpsilonDiffusionDenoiser,
    WienerDenoiser,
    beta_schedule,
    load_diffusion_denoiser,
    noise_ratio,
    resolve_factory,
    schedule_preset,
    timestep_for_sigma,
)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# ---- schedules and t* ----


@pytest.mark.parametrize("preset,expected", [("cifar10-cosine-4000", (1158, 1984, 2809)),
                                             ("imagenet-linear-1000", (145, 259, 396))])
def test_timestep_tables_of_the_authors(preset, expected):
    abar = schedule_preset(preset).alphas_cumprod()
    assert tuple(timestep_for_sigma(abar, s) for s in (0.25, 0.5, 1.0)) == expected
    den = EpsilonDiffusionDenoiser(torch.nn.Identity(), preset)
    assert tuple(den.timestep(s) for s in (0.25, 0.5, 1.0)) == expected


@pytest.mark.parametrize("preset", list(SCHEDULE_PRESETS))
def test_timestep_is_the_first_crossing(preset):
    abar = schedule_preset(preset).alphas_cumprod()
    ratio = noise_ratio(abar)
    for sigma in (0.01, 0.12, 0.25, 0.5, 1.0, 2.0):
        t = timestep_for_sigma(abar, sigma)
        assert t >= 1 and ratio[t] >= 2 * sigma and (t == 1 or ratio[t - 1] < 2 * sigma)


def test_beta_schedules_follow_their_formulas():
    lin = beta_schedule("linear", 1000)
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    assert beta_schedule("linear", 4000)[-1].item() == pytest.approx(0.005)
    abar = DiffusionSchedule("cosine", 4000).alphas_cumprod()

    def f(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    for t in (0, 1000, 2809, 3900):  # away from the 0.999 beta cap, abar_t = f((t+1)/T) / f(0)
        assert abar[t].item() == pytest.approx(f((t + 1) / 4000) / f(0), rel=1e-9)
    assert beta_schedule("cosine", 4000).max().item() == pytest.approx(0.999)


@pytest.mark.parametrize("sigma", [0.0, -0.5, float("nan"), 1e6])
def test_sigma_outside_the_schedule_is_one_line(sigma):
    den = EpsilonDiffusionDenoiser(torch.nn.Identity(), "imagenet-linear-1000")
    with pytest.raises(ConfigError) as err:
        den(torch.rand(1, 3, 4, 4), sigma)
    assert "sigma=" in _one_line(err)


def test_bad_schedule_names_are_one_line():
    calls = (lambda: schedule_preset("cifar10"), lambda: beta_schedule("sqrt", 10), lambda: beta_schedule("linear", 1))
    for call in calls:
        with pytest.raises(ConfigError) as err:
            call()
        _one_line(err)


# ---- the one-shot denoiser ----


class OracleEps(torch.nn.Module):
    """Knows the clean image: eps = (x_t - sqrt(abar_t) x~) / sqrt(1 - abar_t), in 2C channels
    (the second half garbage, as a learned-variance model's)."""

    def __init__(self, clean: torch.Tensor, schedule: DiffusionSchedule, learned_sigma: bool) -> None:
        super().__init__()
        self.clean, self.schedule, self.learned_sigma = clean * 2 - 1, schedule, learned_sigma
        self.abar = schedule.alphas_cumprod()
        self.seen: list[torch.Tensor] = []

    def forward(self, x_t, t):
        self.seen.append(t)
        idx = (t.double() * self.schedule.steps / 1000).round().long() if self.schedule.rescale_timesteps else t
        a = self.abar[idx].view(-1, 1, 1, 1)
        eps = ((x_t.double() - a.sqrt() * self.clean.double()) / (1 - a).sqrt()).float()
        return torch.cat([eps, torch.full_like(eps, 7.0)], 1) if self.learned_sigma else eps


@pytest.mark.parametrize("preset", list(SCHEDULE_PRESETS))
@pytest.mark.parametrize("learned_sigma", [False, True])
def test_oracle_eps_model_denoises_exactly(preset, learned_sigma):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8, generator=g)
    sched = schedule_preset(preset)
    den = EpsilonDiffusionDenoiser(OracleEps(x, sched, learned_sigma), preset)
    for sigma in (0.25, 0.5, 1.0):
        y = x + sigma * torch.randn(x.shape, generator=g)  # the smoothing loop's noise, outside the model
        assert torch.allclose(den(y, sigma), x, atol=2e-5)
    t = den.eps_model.seen[-1]
    if sched.rescale_timesteps:  # improved-diffusion feeds t * 1000 / T as a float
        assert t.dtype == torch.float32 and torch.all(t == 2809 * 0.25)
    else:
        assert t.dtype == torch.long and torch.all(t == 396)


class ZeroEps(torch.nn.Module):
    def forward(self, x_t, t):
        return torch.zeros_like(x_t)


def test_zero_eps_returns_the_clipped_input():
    # eps = 0: x0 = x_t / sqrt(abar) = 2y - 1, so x_hat = clip(y, 0, 1)
    y = torch.randn(2, 3, 5, 5) * 0.7 + 0.5
    den = EpsilonDiffusionDenoiser(ZeroEps(), "cifar10-cosine-4000")
    assert torch.allclose(den(y, 0.5), y.clamp(0, 1), atol=1e-6)


def test_wrong_eps_channels_are_one_line():
    class Bad(torch.nn.Module):
        def forward(self, x_t, t):
            return torch.zeros(x_t.shape[0], 5, *x_t.shape[2:])

    with pytest.raises(ConfigError) as err:
        EpsilonDiffusionDenoiser(Bad(), "imagenet-linear-1000")(torch.rand(1, 3, 4, 4), 0.5)
    assert "3 or 6 channels" in _one_line(err)
    with pytest.raises(ConfigError) as err:  # a grey image into a colour denoiser
        EpsilonDiffusionDenoiser(ZeroEps(), "imagenet-linear-1000")(torch.rand(1, 1, 4, 4), 0.5)
    assert "(B, 3, H, W)" in _one_line(err)


def test_schedule_is_not_in_the_state_dict():
    den = EpsilonDiffusionDenoiser(torch.nn.Conv2d(3, 3, 1), "cifar10-cosine-4000")
    assert set(den.state_dict()) == {"eps_model.weight", "eps_model.bias"}


# ---- the OpenAI checkpoint adapter ----

TINY_ADM = textwrap.dedent('''
    """Stands in for improved-diffusion: a factory returning forward(x, timesteps) -> 2C channels."""
    import torch
    from torch import nn


    class TinyADM(nn.Module):
        def __init__(self, hidden=4, learn_sigma=True):
            super().__init__()
            self.inp = nn.Conv2d(3, hidden, 3, padding=1)
            self.time = nn.Linear(1, hidden)
            self.out = nn.Conv2d(hidden, 6 if learn_sigma else 3, 3, padding=1)

        def forward(self, x, timesteps):
            h = self.inp(x) + self.time(timesteps.float()[:, None] / 1000)[:, :, None, None]
            return self.out(torch.relu(h))


    def cifar10_model():
        return TinyADM()


    def wider_model():
        return TinyADM(hidden=5)


    def not_a_model():
        return 3
''')


@pytest.fixture
def adm(tmp_path, monkeypatch):
    (tmp_path / "tiny_adm_pkg.py").write_text(TINY_ADM)
    monkeypatch.syspath_prepend(str(tmp_path))
    import tiny_adm_pkg

    torch.manual_seed(0)
    weights = tmp_path / "cifar10_uncond.pt"
    torch.save(tiny_adm_pkg.cifar10_model().state_dict(), weights)
    return tiny_adm_pkg, weights


def test_adapter_loads_the_weights_and_records_their_hash(adm):
    module, weights = adm
    den, meta = load_diffusion_denoiser("tiny_adm_pkg:cifar10_model", weights, "cifar10-cosine-4000")
    ref = module.cifar10_model()
    ref.load_state_dict(torch.load(weights, weights_only=True))
    for k, v in ref.state_dict().items():
        assert torch.equal(den.eps_model.state_dict()[k], v)
    assert meta["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert meta["weights_file"] == "cifar10_uncond.pt" and str(weights.parent) not in str(meta)
    assert meta["schedule"] == "cifar10-cosine-4000" and meta["schedule_steps"] == 4000
    assert not den.training and not any(p.requires_grad for p in den.parameters())
    y = torch.rand(2, 3, 8, 8)
    out = den(y, 0.5)  # learned-sigma output: the first 3 of 6 channels are eps
    assert out.shape == y.shape and out.min() >= 0 and out.max() <= 1
    with torch.no_grad():
        a = den.alphas_cumprod[1984].item()
        x_t = math.sqrt(a) * (2 * y - 1)
        eps = ref(x_t, torch.full((2,), 1984 * 0.25))[:, :3]
        expected = ((x_t / math.sqrt(a) - math.sqrt(1 / a - 1) * eps).clamp(-1, 1) + 1) / 2
    assert torch.allclose(out, expected, atol=1e-5)


def test_adapter_refuses_a_mismatched_state_dict_in_one_line(adm):
    _, weights = adm
    with pytest.raises(ConfigError) as err:
        load_diffusion_denoiser("tiny_adm_pkg:wider_model", weights, "cifar10-cosine-4000")
    text = _one_line(err)
    assert "do not fit" in text and "tiny_adm_pkg:wider_model" in text


@pytest.mark.parametrize("ref,words", [("tiny_adm_pkg", "module:function"),
                                       ("no_such_pkg_xyz:model", "does not import"),
                                       ("tiny_adm_pkg:missing", "no attribute"),
                                       ("tiny_adm_pkg:not_a_model", "nn.Module")])
def test_adapter_bad_factories_are_one_line(adm, ref, words):
    _, weights = adm
    with pytest.raises(ConfigError) as err:
        load_diffusion_denoiser(ref, weights, "imagenet-linear-1000")
    assert words in _one_line(err)


def test_adapter_bad_weight_files_are_one_line(adm, tmp_path):
    not_state = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_state)
    code = tmp_path / "code.pt"
    torch.save({"f": resolve_factory}, code)  # a file naming a function: refused, never run
    for path, words in ((not_state, "not a state dict"), (code, "is not a"), (tmp_path / "absent.pt", "no such file")):
        with pytest.raises(ConfigError) as err:
            load_diffusion_denoiser("tiny_adm_pkg:cifar10_model", path, "cifar10-cosine-4000")
        assert words in _one_line(err)
    with pytest.raises(ConfigError) as err:
        load_diffusion_denoiser("tiny_adm_pkg:cifar10_model", adm[1], "cifar10-cosine-1000")
    assert "imagenet-linear-1000" in _one_line(err)


# ---- the Wiener denoiser ----


def test_wiener_lowers_mse_on_digits():
    x = digits_tensors(16)[0].float() / 255
    train, test = x[:1400], x[1400:]
    g = torch.Generator().manual_seed(0)
    for per in ("pixel", "channel"):
        den = WienerDenoiser.fit(train, per=per)
        for sigma in (0.25, 0.5, 1.0):
            y = test + sigma * torch.randn(test.shape, generator=g)
            noisy, denoised = ((y.clamp(0, 1) - test) ** 2).mean().item(), ((den(y, sigma) - test) ** 2).mean().item()
            # vs the noisy input clipped to [0, 1] (measured: per pixel 0.021 / 0.035 / 0.042 vs 0.041 / 0.119 / 0.226)
            assert denoised < (0.6 if per == "pixel" else 0.95) * noisy, (per, sigma, noisy, denoised)
            assert den(y, sigma).min() >= 0 and den(y, sigma).max() <= 1


def test_wiener_is_the_posterior_mean_under_its_prior():
    # x ~ N(mu, v) per pixel, y = x + sigma z: E|x_hat - x|^2 = v sigma^2 / (v + sigma^2), and no other gain does better
    g = torch.Generator().manual_seed(1)
    mu, v, sigma, n = torch.rand(1, 2, 2) * 0.5 + 0.25, torch.rand(1, 2, 2) * 0.05 + 0.01, 0.3, 400_000
    x = mu + v.sqrt() * torch.randn(n, 1, 2, 2, generator=g)
    y = x + sigma * torch.randn(x.shape, generator=g)
    den = WienerDenoiser(mu, v, clip=False)
    mse = ((den(y, sigma) - x) ** 2).mean(0)
    assert torch.allclose(mse, v * sigma**2 / (v + sigma**2), rtol=0.02)
    gain = v / (v + sigma**2)
    for k in (0.9, 1.1):
        assert (((mu + k * gain * (y - mu)) - x) ** 2).mean() > mse.mean()
    # its limits: sigma = 0 is the identity (then clipped); a zero variance returns the mean
    y01 = torch.rand(3, 1, 2, 2)
    assert torch.equal(WienerDenoiser(mu, v)(y01, 0.0), y01)
    assert torch.allclose(WienerDenoiser(mu, torch.zeros_like(v))(y, 0.5), mu.expand_as(y))
    fitted = WienerDenoiser.fit(x[:1000], per="channel")
    assert fitted.mean.shape == (1, 1, 1) and fitted.var.shape == (1, 1, 1)


def test_covariance_wiener_is_its_formula_and_beats_the_diagonal_on_digits():
    g = torch.Generator().manual_seed(2)
    data = torch.rand(50, 2, 2, 2, generator=g) ** 2
    den = CovarianceWienerDenoiser.fit(data, clip=False)
    mu = data.flatten(1).double().mean(0)
    cov = (data.flatten(1).double() - mu).T @ (data.flatten(1).double() - mu) / 50
    y = torch.rand(3, 2, 2, 2, generator=g)
    shrink = torch.linalg.solve(cov + 0.09 * torch.eye(8, dtype=torch.float64), (y.flatten(1).double() - mu).T)
    expected = mu + (cov @ shrink).T
    assert torch.allclose(den(y, 0.3), expected.view_as(y).float(), atol=1e-5)
    assert torch.allclose(den(y, 0.0), y, atol=1e-5)
    x = digits_tensors(8)[0].float() / 255
    train, test = x[:1400], x[1400:]
    noisy = test + 0.5 * torch.randn(test.shape, generator=g)
    full = ((CovarianceWienerDenoiser.fit(train)(noisy, 0.5) - test) ** 2).mean()
    diag = ((WienerDenoiser.fit(train)(noisy, 0.5) - test) ** 2).mean()
    assert full < diag
    with pytest.raises(ConfigError) as err:
        CovarianceWienerDenoiser(torch.zeros(3), torch.eye(2))
    _one_line(err)


# ----------------------------------------------------------------------------- the denoiser-source registry


def test_every_denoiser_source_is_one_registry_entry_that_owns_its_names(tmp_path):
    """Each registered source claims its own names (the file source only what no other claims), refuses
    a bad name in one line without touching a file, and loads a denoiser that maps noisy images to images."""
    from rayrcm.models.denoiser_sources import DENOISER_SOURCES, source_of
    from rayrcm.sections import DataConfig

    examples = {"wiener": "wiener", "wiener_cov": "wiener_cov", "adm": "adm:guided_diffusion:create", "file": str(tmp_path)}
    assert set(DENOISER_SOURCES.names()) == set(examples)  # a new source adds its example here
    for name, text in examples.items():
        assert source_of(text)[0] == name
    assert [n for n in DENOISER_SOURCES.names() if DENOISER_SOURCES.get(n).certify] == ["file"]
    with pytest.raises(ConfigError, match="denoiser_weights"):
        source_of(examples["adm"])[1].check(examples["adm"], "", "")
    with pytest.raises(ConfigError, match="registry references"):
        source_of("models:/den@x")[1].check("models:/den@x", "", "")
    with pytest.raises(ConfigError, match="no such denoiser file"):
        source_of(str(tmp_path / "none.pt"))[1].load(str(tmp_path / "none.pt"), "", "", None)
    data = DataConfig(name="digits", image_size=8)
    for name in ("wiener", "wiener_cov"):
        den, info = DENOISER_SOURCES.get(name).load(name, "", "", data)
        y = torch.rand(2, 3, 8, 8)
        assert den(y, 0.25).shape == y.shape and info["kind"] == name and info["fit_images"] > 0


def test_certify_takes_only_the_file_source():
    from rayrcm.certify.protocol import validate_certify
    from rayrcm.orchestration.certify_job import config_from_args

    for bad, source in (("wiener", "wiener"), ("adm:m:f", "adm")):
        with pytest.raises(ConfigError, match=f"the {source} source is for the cadis objective"):
            validate_certify(config_from_args(["model=m.pt", f"denoiser={bad}"]))
    assert validate_certify(config_from_args(["model=m.pt", "denoiser=den.pt"])).denoiser == "den.pt"
