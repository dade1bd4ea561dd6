"""Denoisers for denoised smoothing: the interface, diffusion noise schedules, the one-shot
diffusion denoiser of DDS, the adapter for OpenAI's checkpoints, and a closed-form Wiener denoiser.

A **denoiser** is any :class:`torch.nn.Module` with ``forward(y, sigma) -> x_hat`` mapping a noisy
image ``y = x + sigma * z`` (``(B, C, H, W)``, ``x`` in [0, 1] pixels, ``sigma`` in the same pixel
units) to a clean estimate ``x_hat`` in [0, 1]. The noise ``z`` is always drawn by rayrcm's
smoothing loop, never inside the denoiser, so a classifier ``f(D(x + sigma z))`` is a base
classifier like any other and the certified radius of randomized smoothing is exact for it
(Carlini, Tramer, Dvijotham, Rice, Sun & Kolter, "(Certified!!) Adversarial Robustness for Free!",
ICLR 2023, "DDS"; Jang et al., "Confidence-aware Denoised Fine-tuning of Off-the-shelf Models for
Certified Robustness", TMLR 2024, "FT-CADIS", which certifies the same composite).

**DDS one-shot denoising.** Diffusion models work on data ``x~ = 2x - 1`` in [-1, 1], where pixel
noise ``sigma`` becomes ``2 sigma``. With ``abar_t`` the cumulative product of ``1 - beta_t``::

    t*  = min{ t >= 1 : sqrt(1 - abar_t) / sqrt(abar_t) >= 2 sigma }
    x_t = sqrt(abar_t*) * (2 y - 1)                     (y = x + sigma z, from the smoothing loop)
    x0  = clip( x_t / sqrt(abar_t*) - sqrt(1/abar_t* - 1) * eps_theta(x_t, t*), -1, 1 )
    x_hat = (x0 + 1) / 2

``t*`` is indexed as the authors index it (``FT-CADIS certify.py:46-53``, ``train.py:260-273``: a
loop from ``t = 1`` over the 0-based arrays of ``gaussian_diffusion.py``), which reproduces their
tables: CIFAR-10 cosine ``T = 4000``: 1158 / 1984 / 2809 at sigma 0.25 / 0.5 / 1.0; ImageNet linear
``T = 1000``: 145 / 259 / 396. Their ``q_sample`` draws fresh noise of std ``sqrt(1 - abar)``
inside the model (an effective sigma up to 0.7% above the certified one); here ``x_t`` is the
rescaled noisy input itself, Carlini et al.'s exact form. The eps-model sees the timestep as
improved-diffusion / guided-diffusion feed it (``_scale_timesteps``: ``t * 1000 / T`` as a float
when ``rescale_timesteps``, as for the CIFAR-10 checkpoint, else the integer ``t``), and a model
trained with learned variances (``L_hybrid``) outputs ``2C`` channels of which the first ``C`` are
epsilon.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from rayrcm.errors import ConfigError
from rayrcm.models.unet import SmallUNet

SCHEDULE_KINDS = ("cosine", "linear")


def beta_schedule(kind: str, steps: int) -> torch.Tensor:
    """The ``(steps,)`` float64 betas of improved-diffusion's ``get_named_beta_schedule``.

    ``linear`` (Ho, Jain & Abbeel, NeurIPS 2020, extended to any ``T``):
    ``beta_i = linspace(1e-4 * 1000/T, 0.02 * 1000/T, T)``. ``cosine`` (Nichol & Dhariwal, ICML 2021):
    ``beta_i = min(1 - abar(i+1/T) / abar(i/T), 0.999)`` with ``abar(s) = cos((s + 0.008)/1.008 * pi/2)^2``.
    """
    if kind not in SCHEDULE_KINDS:
        raise ConfigError("schedule", kind, f"one of {', '.join(SCHEDULE_KINDS)}")
    if int(steps) != steps or steps < 2:
        raise ConfigError("schedule.steps", steps, "an integer >= 2")
    steps = int(steps)
    if kind == "linear":
        scale = 1000 / steps
        return torch.linspace(scale * 0.0001, scale * 0.02, steps, dtype=torch.float64)

    def abar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((i + 1) / steps) / abar(i / steps), 0.999) for i in range(steps)],
                        dtype=torch.float64)


@dataclass(frozen=True)
class DiffusionSchedule:
    """A discrete diffusion: ``kind`` (cosine | linear), ``steps`` ``T``, and whether the eps-model
    takes the timestep rescaled to ``t * 1000 / T`` (improved-diffusion's ``rescale_timesteps``)."""

    kind: str = "cosine"
    steps: int = 1000
    rescale_timesteps: bool = False

    def alphas_cumprod(self) -> torch.Tensor:
        """``abar_t = prod_{s <= t} (1 - beta_s)``, ``(T,)`` float64, index 0 is the first step."""
        return torch.cumprod(1 - beta_schedule(self.kind, self.steps), dim=0)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the eps-model is fed (improved-diffusion ``_scale_timesteps``)."""
        return t.float() * (1000.0 / self.steps) if self.rescale_timesteps else t

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "steps": self.steps, "rescale_timesteps": self.rescale_timesteps}


# The authors' checkpoints (FT-CADIS denoiser.py: Improved_Diffusion_Args / Guided_Diffusion_Args)
SCHEDULE_PRESETS: dict[str, DiffusionSchedule] = {
    "cifar10-cosine-4000": DiffusionSchedule("cosine", 4000, rescale_timesteps=True),  # improved-diffusion, L_hybrid
    "imagenet-linear-1000": DiffusionSchedule("linear", 1000, rescale_timesteps=False),  # guided-diffusion 256 uncond
}


def schedule_preset(name: str) -> DiffusionSchedule:
    if name not in SCHEDULE_PRESETS:
        raise ConfigError("model.denoiser_schedule", name, f"one of {', '.join(SCHEDULE_PRESETS)}")
    return SCHEDULE_PRESETS[name]


def noise_ratio(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``sqrt(1 - abar_t) / sqrt(abar_t)``: the std of the noise ``x_t / sqrt(abar_t)`` carries, [-1, 1] units."""
    return torch.sqrt(1 - alphas_cumprod) / torch.sqrt(alphas_cumprod)


def timestep_for_sigma(alphas_cumprod: torch.Tensor, sigma: float) -> int:
    """``t* = min{t >= 1 : sqrt(1 - abar_t)/sqrt(abar_t) >= 2 sigma}`` (pixel ``sigma``; FT-CADIS
    ``certify.py:46-53``). A ``sigma`` <= 0 or beyond the schedule's last step is one line."""
    ratio = noise_ratio(alphas_cumprod)
    top = float(ratio[-1]) / 2
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and 0 < sigma <= top):
        raise ConfigError("sigma", sigma, f"in (0, {top:.6g}] for this diffusion schedule (pixel units)")
    hits = torch.nonzero(ratio[1:] >= 2 * float(sigma))
    return int(hits[0, 0]) + 1


class Denoiser(nn.Module):
    """The denoiser interface: ``forward(y, sigma) -> x_hat``, ``y`` a noisy image ``(B, C, H, W)``
    around [0, 1] (not clamped), ``sigma`` the pixel noise std, ``x_hat`` in [0, 1]."""

    def forward(self, y: torch.Tensor, sigma: float) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class EpsilonDiffusionDenoiser(Denoiser):
    """DDS one-shot denoiser around an eps-prediction model ``eps_model(x_t, t) -> (B, C or 2C, H, W)``.

    See the module docstring for the formula. Its ``state_dict`` is the eps-model's, under
    ``eps_model.``; the schedule is rebuilt from ``schedule`` (non-persistent buffers).
    """

    alphas_cumprod: torch.Tensor  # buffer

    def __init__(self, eps_model: nn.Module, schedule: DiffusionSchedule | str, channels: int = 3) -> None:
        super().__init__()
        self.eps_model = eps_model
        self.schedule = schedule_preset(schedule) if isinstance(schedule, str) else schedule
        self.channels = int(channels)
        abar = self.schedule.alphas_cumprod()
        self.register_buffer("alphas_cumprod", abar, persistent=False)  # float64, as the authors' numpy arrays
        self._steps: dict[float, int] = {}

    def timestep(self, sigma: float) -> int:
        """``t*`` for pixel ``sigma`` (cached)."""
        sigma = float(sigma)
        if sigma not in self._steps:
            self._steps[sigma] = timestep_for_sigma(self.alphas_cumprod.cpu(), sigma)
        return self._steps[sigma]

    def epsilon(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The first ``C`` output channels of the eps-model at integer step ``t`` (``2C``: learned sigma)."""
        t_vec = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
        out = self.eps_model(x_t, self.schedule.model_time(t_vec))
        c = x_t.shape[1]
        if out.ndim != 4 or out.shape[1] not in (c, 2 * c) or out.shape[2:] != x_t.shape[2:]:
            raise ConfigError("model.denoiser", f"output {tuple(out.shape)}",
                              f"an eps-model output of {c} or {2 * c} channels at {tuple(x_t.shape[2:])}")
        return cast(torch.Tensor, out[:, :c])

    def forward(self, y: torch.Tensor, sigma: float) -> torch.Tensor:
        if y.ndim != 4 or y.shape[1] != self.channels:
            raise ConfigError("model.denoiser", f"input {tuple(y.shape)}", f"images (B, {self.channels}, H, W)")
        t = self.timestep(sigma)
        a = float(self.alphas_cumprod[t])
        # float64 coefficients rounded to float32, as the authors' _extract_into_tensor
        sqrt_a, recip, recipm1 = torch.tensor([math.sqrt(a), math.sqrt(1 / a), math.sqrt(1 / a - 1)]).tolist()
        x_t = sqrt_a * (2 * y - 1)
        eps = self.epsilon(x_t, t).to(x_t.dtype)
        x0 = (recip * x_t - recipm1 * eps).clamp(-1, 1)
        return cast(torch.Tensor, (x0 + 1) / 2)


def ddpm_denoiser(method: object) -> EpsilonDiffusionDenoiser:
    """The untrained DDS denoiser around a :class:`~rayrcm.models.unet.SmallUNet` that the ``ddpm``
    method config describes (the config itself or its dict, as ``model.pt`` meta records it):
    fields ``schedule``, ``steps``, ``base_channels``, ``channel_mults``, ``channels``; the UNet is
    fed the integer timestep."""
    get = method.get if isinstance(method, Mapping) else (lambda k, d=None: getattr(method, k, d))
    channels = int(get("channels", 3))
    unet = SmallUNet(channels, int(get("base_channels", 32)), tuple(int(m) for m in get("channel_mults", (1, 2))))
    sched = DiffusionSchedule(str(get("schedule", "cosine")), int(get("steps", 1000)), rescale_timesteps=False)
    return EpsilonDiffusionDenoiser(unet, sched, channels)


def denoiser_from_meta(meta: dict[str, Any]) -> EpsilonDiffusionDenoiser:
    """Build function of the ``denoiser`` export kind: the network a ``ddpm`` model file's meta describes."""
    method = meta.get("config", {}).get("method", {}) if isinstance(meta.get("config"), dict) else {}
    if method.get("name") != "ddpm":
        raise ConfigError("model", method.get("name"), "a denoiser file written by method ddpm")
    return ddpm_denoiser(method)


class WienerDenoiser(Denoiser):
    """Closed-form denoiser under an independent Gaussian prior ``x ~ N(mu, v)`` per pixel or per channel:

        x_hat = clip( mu + v / (v + sigma^2) * (y - mu), 0, 1 )

    the posterior mean ``E[x | y]`` for ``y = x + sigma z`` when the prior holds (Wiener, 1949), hence
    the least-squares linear estimator of ``x`` from ``y`` for any data with that mean and variance;
    its expected squared error per pixel (before clipping) is ``v sigma^2 / (v + sigma^2)``.
    ``mean`` and ``var`` broadcast against ``(C, H, W)``; :meth:`fit` estimates them from clean images.
    """

    mean: torch.Tensor  # buffers
    var: torch.Tensor

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, clip: bool = True) -> None:
        super().__init__()
        if bool(torch.any(var < 0)):
            raise ConfigError("var", float(var.min()), "a prior variance >= 0")
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("var", var.detach().float().clone())
        self.clip = clip

    @classmethod
    def fit(cls, images: torch.Tensor, per: str = "pixel", clip: bool = True) -> WienerDenoiser:
        """Prior mean and (biased) variance of clean ``images`` ``(N, C, H, W)`` in [0, 1], per pixel or per channel."""
        if per not in ("pixel", "channel"):
            raise ConfigError("per", per, "pixel or channel")
        x = images.float()
        dims = (0,) if per == "pixel" else (0, 2, 3)
        mean = x.mean(dim=dims, keepdim=True)[0]
        var = x.var(dim=dims, unbiased=False, keepdim=True)[0]
        return cls(mean, var, clip=clip)

    def forward(self, y: torch.Tensor, sigma: float) -> torch.Tensor:
        gain = self.var / (self.var + float(sigma) ** 2) if sigma > 0 else torch.ones_like(self.var)
        x_hat = self.mean + gain * (y - self.mean)
        return x_hat.clamp(0, 1) if self.clip else x_hat


class CovarianceWienerDenoiser(Denoiser):
    """Closed-form denoiser under a full Gaussian prior ``x ~ N(mu, Sigma)`` over the flattened image:

        x_hat = clip( mu + Sigma (Sigma + sigma^2 I)^-1 (y - mu), 0, 1 )

    (the posterior mean, the MMSE linear estimator; the form METHODS.md section 1 gives for the
    bundled Wiener denoiser). With ``Sigma = U diag(lam) U^T`` it is
    ``mu + U diag(lam / (lam + sigma^2)) U^T (y - mu)``, one eigendecomposition for every sigma.
    """

    mean: torch.Tensor  # buffers
    eigvals: torch.Tensor
    eigvecs: torch.Tensor

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor, clip: bool = True) -> None:
        super().__init__()
        d = mean.numel()
        if cov.shape != (d, d):
            raise ConfigError("cov", tuple(cov.shape), f"a ({d}, {d}) covariance for a mean of {d} entries")
        lam, vecs = torch.linalg.eigh(((cov + cov.T) / 2).double())
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("eigvals", lam.clamp_min(0).float())
        self.register_buffer("eigvecs", vecs.float())
        self.clip = clip

    @classmethod
    def fit(cls, images: torch.Tensor, clip: bool = True) -> CovarianceWienerDenoiser:
        """Mean and (biased) covariance of clean ``images`` ``(N, C, H, W)`` in [0, 1]."""
        x = images.double().flatten(1)
        mean = x.mean(0)
        centred = x - mean
        return cls(mean.view(images.shape[1:]), centred.T @ centred / x.shape[0], clip=clip)

    def forward(self, y: torch.Tensor, sigma: float) -> torch.Tensor:
        gain = self.eigvals / (self.eigvals + float(sigma) ** 2) if sigma > 0 else torch.ones_like(self.eigvals)
        r = (y - self.mean).flatten(1).to(self.eigvecs.dtype) @ self.eigvecs
        x_hat = self.mean + ((r * gain) @ self.eigvecs.T).view_as(y).to(y.dtype)
        return x_hat.clamp(0, 1) if self.clip else x_hat


# ---- the adapter for OpenAI improved-diffusion / guided-diffusion checkpoints ----


def resolve_factory(ref: str) -> Callable[[], nn.Module]:
    """The callable named ``module:function`` (importable; the user's installed code)."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError("model.denoiser", ref, "a model factory as module:function (e.g. mypkg.adm:cifar10_model)")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's environment: one line
        raise ConfigError("model.denoiser", ref, f"module {module_name} does not import ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:160] if str(err) else ''})") from None
    fn: object = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError("model.denoiser", ref, f"{module_name} has no attribute {attr}")
    if not callable(fn):
        raise ConfigError("model.denoiser", ref, "names something that is not callable")
    return cast("Callable[[], nn.Module]", fn)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _state_dict_of(blob: Any, path: str | Path) -> Mapping[str, torch.Tensor]:
    if isinstance(blob, Mapping) and blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return blob
    raise ConfigError("model.denoiser_weights", str(path), "is not a state dict (a mapping of names to tensors)")


def load_diffusion_denoiser(factory: str, weights: str | Path, schedule: str,
                            channels: int = 3) -> tuple[EpsilonDiffusionDenoiser, dict[str, Any]]:
    """An :class:`EpsilonDiffusionDenoiser` around the user's OpenAI model, and its metadata.

    ``factory`` is ``module:function`` returning an :class:`nn.Module` with ``forward(x, t)`` ->
    eps (``C`` or ``2C`` channels); ``weights`` a ``torch.save``'d state dict, read with
    ``weights_only=True`` and loaded with ``strict=True``; ``schedule`` a preset name
    (:data:`SCHEDULE_PRESETS`). The metadata carries the file's SHA-256 (not its path) for the
    certification protocol. The model is returned frozen and in eval mode.
    """
    from rayrcm.data.safe_pickle import load_weights_file

    sched = schedule_preset(schedule)
    fn = resolve_factory(factory)
    blob = load_weights_file(weights, "model.denoiser_weights")
    state = _state_dict_of(blob, weights)
    model = fn()
    if not isinstance(model, nn.Module):
        raise ConfigError("model.denoiser", factory, f"returned {type(model).__name__}, not a torch nn.Module")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = " ".join(str(err).split())[:200]
        raise ConfigError("model.denoiser_weights", Path(weights).name,
                          f"weights do not fit the model {factory} builds ({first})") from None
    model.eval().requires_grad_(False)
    meta = {
        "kind": "diffusion",
        "factory": factory,
        "schedule": schedule,
        **{f"schedule_{k}": v for k, v in sched.to_dict().items()},
        "channels": int(channels),
        "weights_file": Path(weights).name,
        "weights_sha256": file_sha256(weights),
    }
    return EpsilonDiffusionDenoiser(model, sched, channels).eval(), meta
